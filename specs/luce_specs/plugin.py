"""pytest plugin behind the conformance specs.

Loaded by ``specs/luce_specs/conftest.py`` (``pytest`` from the repository root) or with
``-p luce_specs.plugin`` (the ``luce specs`` runner); pytest registers a plugin module once per
name, so both together do not register it twice.

A spec module declares ``LUCE_ROLE`` and ``LUCE_VARIANTS`` (variant id -> RunConfig); every test
in it that takes a ``subject`` argument is parametrized over the implementations of that role
installed here (see ``luce_specs.subjects``). ``LUCE_REASONS_AT_COLLECTION = False`` leaves the
``requires`` check to the test (loaders claim files that exist only at test time).
"""
from __future__ import annotations

import os

import pytest

from luce_core.plugin_api import RunConfig, probe
from luce_specs.subjects import plan

OPTION = "--luce-plugin"
ENV = "LUCE_SPECS_PLUGIN"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("luce", "luce conformance specs")
    group.addoption(OPTION, dest="luce_plugin", default=None, metavar="NAME",
                    help=f"run the specs only on implementations from plugin NAME (entry-point "
                         f"name; default: ${ENV}, else every installed plugin)")


def plugin_filter(config: pytest.Config) -> str | None:
    return config.getoption("luce_plugin") or os.environ.get(ENV) or None


def pytest_configure(config: pytest.Config) -> None:
    name = plugin_filter(config)
    if name is None:
        return
    from luce_core.plugin_api import host

    names = host().plugin_names()
    if name not in names:
        raise pytest.UsageError(
            f"{OPTION}/{ENV}: no luce plugin named {name!r} is installed (installed: {', '.join(names) or 'none'}); "
            f"the name is the entry point's name in group 'luce', see `luce doctor`")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "subject" not in metafunc.fixturenames:
        return
    module = metafunc.module
    role = getattr(module, "LUCE_ROLE", None)
    if role is None:
        raise pytest.UsageError(f"{module.__name__} takes `subject` but declares no LUCE_ROLE")
    from luce_core.plugin_api import host

    variants: dict[str, RunConfig] = getattr(module, "LUCE_VARIANTS", None) or {"": RunConfig()}
    planned = plan(role, host().impls(role), probe(), variants, plugin_filter(metafunc.config),
                   check_reasons=getattr(module, "LUCE_REASONS_AT_COLLECTION", True))
    metafunc.parametrize("subject", [
        pytest.param(p.subject, id=p.id, marks=[pytest.mark.skip(reason=p.skip)] if p.skip else [])
        for p in planned])

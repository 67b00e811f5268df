"""The plugin host: entry-point discovery, allow/block lists, hook validation, descriptor checks,
how the specs parametrize over what it finds, and meta-tests that every hook is documented and
has a spec suite."""
from __future__ import annotations

import ast
import importlib.metadata
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from luce_core import Impl, hookimpl, plugin_host
from luce_core.contract import CONTRACT_VERSION
from luce_core.contract import hookspecs
from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.contract.errors import ConfigError, PluginError
from luce_core.contract.impl import ROLES

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"torch": "luce_torch.plugin", "cuda": "luce_cuda.plugin", "gguf": "luce_gguf.plugin",
               "drafters": "luce_drafters.plugin", "chunk_selectors": "luce_chunks.plugin",
               # `luce` subcommands only (register_commands)
               "tools": "luce_tools.plugin", "specs": "luce_specs.commands"}


def _entry_point_names() -> set[str]:
    return {ep.name for ep in importlib.metadata.entry_points(group=plugin_host.GROUP)}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("LUCE_PLUGINS", raising=False)
    monkeypatch.delenv("LUCE_DISABLE_PLUGINS", raising=False)
    return monkeypatch


# ----------------------------------------------------------------------------- discovery
def test_first_party_plugins_come_from_entry_points(clean_env) -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=plugin_host.GROUP)}
    for name, module in FIRST_PARTY.items():
        assert eps[name].value == module
        assert eps[name].dist is not None and eps[name].dist.metadata["Name"] == "luce"
    host = plugin_host.host()
    assert set(host.plugin_names()) == set(eps)  # everything installed, nothing special-cased
    for name, module in FIRST_PARTY.items():
        assert host.pm.get_plugin(name) is sys.modules[module]
        assert host.distributions[name].startswith("luce ")
    torch_linear = {i.name: i for i in host.impls("linear")}["torch"]
    assert torch_linear.plugin == "torch"


@pytest.mark.parametrize("allow, expected", [("torch", {"torch"}), ("", set()), (" torch , gguf ", {"torch", "gguf"}),
                                             ("gguf,no-such-plugin", {"gguf"})])
def test_allowlist(clean_env, allow: str, expected: set[str]) -> None:
    clean_env.setenv("LUCE_PLUGINS", allow)
    host = plugin_host.host()
    assert set(host.plugin_names()) == expected
    assert {i.plugin for i in host.impls("linear")} <= expected
    if not expected:
        assert all(host.impls(role) == [] for role in ROLES)


def test_blocklist(clean_env) -> None:
    clean_env.setenv("LUCE_DISABLE_PLUGINS", "torch,cuda")
    host = plugin_host.host()
    assert set(host.plugin_names()) == _entry_point_names() - {"torch", "cuda"}
    assert all(i.plugin not in ("torch", "cuda") for role in ROLES for i in host.impls(role))


def test_blocklist_wins_over_allowlist(clean_env) -> None:
    clean_env.setenv("LUCE_PLUGINS", "torch,gguf")
    clean_env.setenv("LUCE_DISABLE_PLUGINS", "gguf")
    assert plugin_host.host().plugin_names() == ["torch"]


def test_reset_rereads_the_environment(clean_env) -> None:
    clean_env.setenv("LUCE_PLUGINS", "torch")
    assert plugin_host.host().plugin_names() == ["torch"]
    clean_env.setenv("LUCE_PLUGINS", "gguf")
    assert plugin_host.host().plugin_names() == ["torch"]  # the host is process-wide ...
    plugin_host.reset()
    assert plugin_host.host().plugin_names() == ["gguf"]  # ... until reset


def test_plugin_that_fails_to_import_is_skipped_with_a_warning(clean_env) -> None:
    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint(name="broken", value="luce_no_such_module.plugin", group=plugin_host.GROUP)

    def entry_points(**kw):
        eps = list(real(**kw))
        return eps + [broken] if kw.get("group") == plugin_host.GROUP else eps

    clean_env.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.warns(UserWarning, match="broken"):
        host = plugin_host.PluginHost()
    assert "broken" in host.load_errors and "luce_no_such_module" in host.load_errors["broken"]
    assert "broken" not in host.plugin_names() and "torch" in host.plugin_names()


# ----------------------------------------------------------------------------- validation
def _impl(name: str, role: str = "linear", priority: int = 0) -> Impl:
    return Impl(role, name, "luce_no_such_module:Factory", contract=CONTRACT_VERSION, priority=priority)


class Provides:
    """A plugin object returning fixed descriptors from provide_linear."""

    def __init__(self, *items):
        self.items = list(items)

    @hookimpl
    def provide_linear(self):
        return self.items


def test_misspelled_hook_is_rejected() -> None:
    class Misspelled:
        @hookimpl
        def provide_linaer(self):
            return [_impl("x")]

    host = plugin_host.PluginHost(load_entrypoints=False)
    with pytest.raises(PluginError, match="provide_linaer") as e:
        host.register(Misspelled(), "typo")
    assert "LUCE_DISABLE_PLUGINS=typo" in str(e.value)
    assert host.plugin_names() == []
    host.register(Provides(_impl("fine")), "fine")  # the host still works afterwards
    assert [i.name for i in host.impls("linear")] == ["fine"]


def test_hook_with_unknown_arguments_is_rejected() -> None:
    class WantsArgs:
        @hookimpl
        def provide_linear(self, caps):
            return []

    host = plugin_host.PluginHost(load_entrypoints=False)
    with pytest.raises(PluginError, match="caps"):
        host.register(WantsArgs(), "args")
    assert host.plugin_names() == []


@pytest.mark.parametrize("bad", ["not an impl", None, _impl("x", role="attention")])
def test_returning_a_non_impl_or_wrong_role_is_an_error(bad) -> None:
    host = plugin_host.PluginHost(load_entrypoints=False)
    host.register(Provides(_impl("ok"), bad), "bad")
    with pytest.raises(PluginError, match="'bad'"):
        host.impls("linear")


def test_duplicate_names_are_an_error() -> None:
    host = plugin_host.PluginHost(load_entrypoints=False)
    host.register(Provides(_impl("same")), "first")
    host.register(Provides(_impl("same", priority=5)), "second")
    with pytest.raises(PluginError) as e:
        host.impls("linear")
    assert "'same'" in str(e.value) and "first" in str(e.value) and "second" in str(e.value)


def test_hook_that_raises_is_an_error_naming_the_plugin() -> None:
    class Raises:
        @hookimpl
        def provide_linear(self):
            raise RuntimeError("boom")

    host = plugin_host.PluginHost(load_entrypoints=False)
    host.register(Raises(), "raiser")
    with pytest.raises(PluginError, match="raiser.*boom") as e:
        host.impls("linear")
    assert "LUCE_DISABLE_PLUGINS=raiser" in str(e.value)


def test_impls_are_tagged_with_their_plugin_and_unknown_role_is_an_error() -> None:
    host = plugin_host.PluginHost(load_entrypoints=False)
    host.register(Provides(_impl("b"), _impl("a")), "mine")
    assert [(i.name, i.plugin) for i in host.impls("linear")] == [("a", "mine"), ("b", "mine")]
    with pytest.raises(PluginError, match="unknown role"):
        host.impls("linaer")


# ----------------------------------------------------------------------------- spec parametrization
def _caps() -> Caps:
    return Caps()


def _needs(reason: str, variant_reason: dict[str, str] | None = None):
    def requires(caps: Caps, config: RunConfig) -> list[str]:
        out = [reason] if reason else []
        for qtype, why in (variant_reason or {}).items():
            if qtype in config.weight_types:
                out.append(why)
        return out
    return requires


def test_spec_plan_skips_what_cannot_run_with_its_reasons() -> None:
    from luce_specs.subjects import plan

    variants = {q: RunConfig(weight_types={q}) for q in ("Q4_0", "Q8_0")}
    impls = [
        Impl("linear", "fast", "m:f", contract=CONTRACT_VERSION, requires=_needs("needs a GPU with cc >= 8.0"), plugin="p1"),
        Impl("linear", "partial", "m:f", contract=CONTRACT_VERSION, requires=_needs("", {"Q8_0": "no Q8_0 kernel"}), plugin="p2"),
        Impl("linear", "ref", "m:f", contract=CONTRACT_VERSION, plugin="p2"),
    ]
    got = {p.id: p for p in plan("linear", impls, _caps(), variants)}
    assert set(got) == {"p1.fast", "p2.partial-Q4_0", "p2.partial-Q8_0", "p2.ref-Q4_0", "p2.ref-Q8_0"}
    assert got["p1.fast"].subject is None and "needs a GPU with cc >= 8.0" in got["p1.fast"].skip
    assert got["p2.partial-Q8_0"].subject is None and "no Q8_0 kernel" in got["p2.partial-Q8_0"].skip
    assert got["p2.partial-Q4_0"].skip is None and got["p2.partial-Q4_0"].subject.config.weight_types == {"Q4_0"}
    only = plan("linear", impls, _caps(), variants, plugin="p1")
    assert [p.id for p in only] == ["p1.fast"]
    none = plan("drafter", [], _caps(), {"": RunConfig()})
    assert [(p.subject, p.skip) for p in none] == [(None, "no drafter implementation installed")]
    late = plan("loader", impls[:1], _caps(), {"": RunConfig()}, check_reasons=False)
    assert late[0].subject is not None and late[0].skip is None  # the test asks requires() itself


def _pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_spec_plugin_loads_once_both_ways() -> None:
    # specs/luce_specs/conftest.py enables the plugin; -p enables it again: pytest must register it once
    proc = _pytest("-p", "luce_specs.plugin", "--co", "-q", "specs/luce_specs/test_chunk_selector.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_selection_properties" in proc.stdout


def test_spec_plugin_filter_must_name_an_installed_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    import luce_specs.plugin as spec_plugin

    class Config:
        def __init__(self, name: str | None):
            self.name = name

        def getoption(self, option: str) -> str | None:
            assert option == "luce_plugin"
            return self.name

    monkeypatch.delenv(spec_plugin.ENV, raising=False)
    with pytest.raises(pytest.UsageError, match="no luce plugin named 'no-such-plugin'"):
        spec_plugin.pytest_configure(Config("no-such-plugin"))
    spec_plugin.pytest_configure(Config("torch"))  # installed: accepted
    monkeypatch.setenv(spec_plugin.ENV, "also-missing")  # the environment variable is checked too
    with pytest.raises(pytest.UsageError, match="also-missing"):
        spec_plugin.pytest_configure(Config(None))


def test_runner_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from luce_specs import hyp, runner

    args = runner.pytest_args(["--plugin", "example", "--", "-x", "-k", "Q4_0"])
    assert args[args.index("--pyargs") + 1] == "luce_specs"
    assert args[args.index("--luce-plugin") + 1] == "example"
    assert args[-3:] == ["-x", "-k", "Q4_0"] and "--" not in args
    assert "--luce-plugin" not in runner.pytest_args(["-q"])
    assert runner.main(["--max-examples", "0"]) == 2
    monkeypatch.setenv(hyp.ENV, "7")
    assert hyp.spec_settings(30).max_examples == 7 and hyp.spec_settings(30).deadline is None
    monkeypatch.setenv(hyp.ENV, "lots")
    with pytest.raises(ConfigError, match=hyp.ENV):
        hyp.spec_settings(30)


# ----------------------------------------------------------------------------- meta
def _hookspecs() -> dict[str, object]:
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, marker)}


def test_every_role_has_exactly_one_hook() -> None:
    specs = _hookspecs()
    assert set(hookspecs.HOOK_OF_ROLE) == set(ROLES)
    # every other hook is a command hook, not a role
    assert set(hookspecs.HOOK_OF_ROLE.values()) == set(specs) - {"register_commands"}


@pytest.mark.parametrize("hook", sorted(_hookspecs()))
def test_hook_is_documented(hook: str) -> None:
    doc = inspect.getdoc(_hookspecs()[hook])
    assert doc and len(doc.split()) >= 8, f"{hook} needs a docstring saying what its descriptors build"
    assert hook in (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8"), f"CONTRIBUTING.md does not mention {hook}"


@pytest.mark.parametrize("role, hook", sorted(hookspecs.HOOK_OF_ROLE.items()))
def test_hook_has_a_spec_suite(role: str, hook: str) -> None:
    path = REPO / "specs" / "luce_specs" / f"test_{role}.py"
    assert path.exists(), f"no spec suite for {hook}: expected {path}"
    tree = ast.parse(path.read_text())
    declared = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}
    assert isinstance(declared.get("LUCE_ROLE"), ast.Constant) and declared["LUCE_ROLE"].value == role
    tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
             and "subject" in [a.arg for a in n.args.args]]
    assert tests, f"{path.name} has no test taking `subject` (parametrized over {role} implementations)"


def test_no_warnings_from_a_clean_host(clean_env) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        host = plugin_host.host()
        for role in ROLES:
            host.impls(role)
    assert host.load_errors == {}

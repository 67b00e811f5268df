"""The plugin manager: entry-point discovery, allow/block lists, and descriptor collection.

First-party implementations (torch, cuda, gguf, ...) register through the same ``luce``
entry-point group as third-party packages; nothing is special-cased.

Environment:
  LUCE_PLUGINS          comma-separated allowlist of entry-point names (empty: load none)
  LUCE_DISABLE_PLUGINS  comma-separated blocklist of entry-point names
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import warnings
from typing import Any

import attrs
import pluggy

from luce_core.contract import hookspecs
from luce_core.contract.errors import PluginError
from luce_core.contract.impl import ROLES, Impl

GROUP = "luce"


def _names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


class PluginHost:
    """A pluggy PluginManager plus the bookkeeping luce needs around it."""

    def __init__(self, load_entrypoints: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.load_errors: dict[str, str] = {}
        self.distributions: dict[str, str] = {}
        if load_entrypoints:
            self._load_entrypoints()

    def _load_entrypoints(self) -> None:
        allow, block = _names("LUCE_PLUGINS"), _names("LUCE_DISABLE_PLUGINS") or set()
        for name in block:
            self.pm.set_blocked(name)
        eps = importlib.metadata.entry_points(group=GROUP)
        for ep in sorted(eps, key=lambda e: e.name):
            if (allow is not None and ep.name not in allow) or self.pm.is_blocked(ep.name):
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as e:  # a broken third-party plugin must not take luce down
                self.load_errors[ep.name] = f"{type(e).__name__}: {e}"
                warnings.warn(f"luce: plugin {ep.name!r} failed to import ({e}); it is skipped",
                              stacklevel=2)
                continue
            self.register(module, ep.name)
            dist = getattr(ep, "dist", None)
            if dist is not None:
                self.distributions[ep.name] = f"{dist.metadata['Name']} {dist.version}"

    def register(self, plugin: Any, name: str) -> None:
        """Register a plugin object or module and validate its hooks against the specs."""
        try:
            self.pm.register(plugin, name=name)  # raises for a hook taking arguments its spec lacks
            self.pm.check_pending()  # raises for a hook name no spec has
        except pluggy.PluginValidationError as e:
            if self.pm.get_plugin(name) is not None:  # pluggy keeps a half-registered plugin
                self.pm.unregister(name=name)
            raise PluginError(f"plugin {name!r} implements an unknown hook or hook signature: {e}",
                              remedy=f"fix the hook, or disable it with LUCE_DISABLE_PLUGINS={name}") from None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)

    def plugin_names(self) -> list[str]:
        return sorted(n for n, p in self.pm.list_name_plugin() if p is not None)

    def impls(self, role: str) -> list[Impl]:
        """Every descriptor for a role, tagged with the plugin that provided it."""
        if role not in ROLES:
            raise PluginError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        hook = getattr(self.pm.hook, hookspecs.HOOK_OF_ROLE[role])
        found: dict[str, Impl] = {}
        for hi in hook.get_hookimpls():
            try:
                got = hi.function() or []
            except Exception as e:
                raise PluginError(f"plugin {hi.plugin_name!r} failed in {hook.name}(): {e}",
                                  remedy=f"disable it with LUCE_DISABLE_PLUGINS={hi.plugin_name}") from e
            for impl in got:
                if not isinstance(impl, Impl) or impl.role != role:
                    raise PluginError(f"plugin {hi.plugin_name!r} returned {impl!r} from {hook.name}(); "
                                      f"expected luce_core.Impl descriptors with role={role!r}")
                if impl.name in found:
                    raise PluginError(
                        f"two {role} implementations are named {impl.name!r} "
                        f"(plugins {found[impl.name].plugin!r} and {hi.plugin_name!r})",
                        remedy="disable one of them with LUCE_DISABLE_PLUGINS")
                found[impl.name] = attrs.evolve(impl, plugin=hi.plugin_name)
        return sorted(found.values(), key=lambda i: i.name)

    def register_commands(self, subparsers: argparse._SubParsersAction) -> dict[str, str]:
        """Let every plugin add its ``luce`` subcommands (after the core's own); returns command
        -> plugin name ("luce" for the core's). A plugin whose hook raises is skipped with a
        warning, its half-added commands removed, as a plugin that fails to import is; two
        commands of one name are a PluginError."""
        owner = {name: "luce" for name in subparsers.choices}
        for hi in self.pm.hook.register_commands.get_hookimpls():
            before = dict(subparsers.choices)
            broken: Exception | None = None
            try:
                hi.function(subparsers=subparsers)
            except Exception as e:  # a broken plugin must not take `luce` down
                broken = e
            # a second command of one name: Python 3.11's argparse refuses it, 3.10's replaces the first
            if isinstance(broken, argparse.ArgumentError) and "conflicting subparser" in str(broken):
                taken: str | None = str(broken).rpartition(": ")[2]
            else:
                taken = next((n for n, parser in before.items() if subparsers.choices.get(n) is not parser), None)
            if taken is not None:
                raise PluginError(f"plugin {hi.plugin_name!r} adds the command {taken!r}, which "
                                  f"{owner.get(taken, 'another plugin')!r} adds too",
                                  remedy="disable one of them with LUCE_DISABLE_PLUGINS")
            added = set(subparsers.choices) - set(before)
            if broken is not None:
                for name in added:
                    del subparsers.choices[name]
                # the help listing keeps its own list (argparse has no public way to remove a command)
                subparsers._choices_actions[:] = [a for a in subparsers._choices_actions if a.dest not in added]
                warnings.warn(f"luce: plugin {hi.plugin_name!r} failed to add its commands ({broken}); "
                              "they are skipped", stacklevel=2)
                continue
            owner.update(dict.fromkeys(added, hi.plugin_name))
        return owner


_host: PluginHost | None = None


def host() -> PluginHost:
    """The process-wide plugin host, created on first use."""
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def reset() -> None:
    """Forget the process-wide host (tests; after changing LUCE_PLUGINS)."""
    global _host
    _host = None

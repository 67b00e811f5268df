"""Which implementations a role suite runs on: one pytest parameter per (implementation, variant).

A *variant* is a configuration the suite exercises (a weight type, a KV dtype pair, an attention
geometry); each implementation is asked through ``requires`` whether it can run it. What cannot
run is still collected, as a skip that carries the implementation's own reasons, so a plugin
author sees why their code was not exercised instead of a silently shorter run.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import attrs

from luce_core.plugin_api import Caps, Impl, RunConfig


@attrs.frozen(repr=False)
class Subject:
    """One implementation under test, with the configuration of the case it runs."""

    impl: Impl
    variant: str
    config: RunConfig
    caps: Caps

    @property
    def device(self) -> str:
        """The torch device the case runs on: the best one this machine offers."""
        return "cuda" if self.caps.device == "cuda" else "cpu"

    def reasons(self, config: RunConfig | None = None) -> list[str]:
        return self.impl.reasons(self.caps, config if config is not None else self.config)

    def create(self, config: RunConfig | None = None) -> Any:
        return self.impl.create(self.caps, config if config is not None else self.config)

    @property
    def id(self) -> str:
        base = f"{self.impl.plugin}.{self.impl.name}"
        return f"{base}-{self.variant}" if self.variant else base

    def __repr__(self) -> str:  # falsifying examples print it: the id says all that varies
        return f"Subject({self.id})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' pretty printer
        printer.text(repr(self))


@attrs.frozen
class Planned:
    """A parameter before it becomes a ``pytest.param``: the subject, or why there is none."""

    id: str
    subject: Subject | None
    skip: str | None = None


def plan(role: str, impls: Sequence[Impl], caps: Caps, variants: Mapping[str, RunConfig],
         plugin: str | None = None, check_reasons: bool = True) -> list[Planned]:
    """The parameters of a ``role`` suite.

    impls from other plugins than ``plugin`` (when given) are left out, not skipped. An
    implementation that can run none of the variants is one skip listing its reasons; one that
    can run some is a skip per refused variant. With ``check_reasons=False`` the test itself
    asks (loaders claim a file that only exists at test time).
    """
    mine = [i for i in impls if plugin is None or i.plugin == plugin]
    if not mine:
        where = f" from plugin {plugin!r}" if plugin else ""
        return [Planned("none", None, f"no {role} implementation{where} installed")]
    out: list[Planned] = []
    for impl in sorted(mine, key=lambda i: (i.plugin, i.name)):
        subjects = [Subject(impl, v, cfg, caps) for v, cfg in variants.items()]
        if not check_reasons:
            out += [Planned(s.id, s) for s in subjects]
            continue
        why = {s.variant: s.reasons() for s in subjects}
        if all(why.values()):
            reasons = sorted({r for rs in why.values() for r in rs})
            out.append(Planned(f"{impl.plugin}.{impl.name}", None,
                               f"{role} {impl.name!r} cannot run here: {'; '.join(reasons)}"))
            continue
        for s in subjects:
            skip = f"{role} {impl.name!r} refuses {s.variant}: {'; '.join(why[s.variant])}" if why[s.variant] else None
            out.append(Planned(s.id, None if skip else s, skip))
    return out

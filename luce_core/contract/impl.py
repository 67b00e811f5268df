"""Implementation descriptors: what a plugin hook returns for a role.

A descriptor is data, not work: creating one imports nothing heavy and probes nothing. The core
ranks descriptors, asks each for the reasons it cannot run, and only then imports the factory.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

import attrs

if TYPE_CHECKING:
    from luce_core.caps import Caps
    from luce_core.config import RunConfig

ROLES: tuple[str, ...] = ("loader", "linear", "attention", "kv_storage", "drafter", "chunk_selector")


def _no_requirements(caps: "Caps", config: "RunConfig") -> list[str]:
    return []


@attrs.frozen
class Impl:
    """One implementation of one role.

    requires(caps, config) returns the reasons this implementation cannot run on this machine
    with this configuration; an empty list means it can. factory is "module:attr" naming a
    callable ``(caps, config) -> role object``, imported only when the implementation is used.
    """

    role: str = attrs.field(validator=attrs.validators.in_(ROLES))
    name: str
    factory: str
    priority: int = 0
    requires: Callable[["Caps", "RunConfig"], list[str]] = _no_requirements
    summary: str = ""
    plugin: str = ""  # filled in by the plugin manager: which registered plugin provided it

    def reasons(self, caps: "Caps", config: "RunConfig") -> list[str]:
        """requires(), with a crash in the check itself turned into a reason."""
        try:
            return [str(r) for r in self.requires(caps, config)]
        except Exception as e:  # a broken check must not abort selection of the others
            return [f"requires() raised {type(e).__name__}: {e}"]

    def load(self) -> Callable[..., Any]:
        module, _, attr = self.factory.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def create(self, caps: "Caps", config: "RunConfig") -> Any:
        return self.load()(caps, config)

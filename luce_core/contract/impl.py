"""Implementation descriptors: what a plugin hook returns for a role.

A descriptor is data, not work: creating one imports nothing heavy and probes nothing. The core
ranks descriptors, asks each for the reasons it cannot run, and only then imports the factory.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

import attrs

from luce_core.contract import CONTRACT_VERSION

if TYPE_CHECKING:
    from luce_core.caps import Caps
    from luce_core.config import RunConfig

ROLES: tuple[str, ...] = ("loader", "linear", "attention", "kv_storage", "drafter", "chunk_selector")


def _no_requirements(caps: "Caps", config: "RunConfig") -> list[str]:
    return []


def contract_reasons(stated: str, core: str = CONTRACT_VERSION) -> list[str]:
    """Why an implementation built for contract ``stated`` cannot run on this luce (empty: it
    can). Same major version: it can (minor versions only add optional members). Nothing
    stated: refused, since luce cannot tell what it was built for (see luce_core.contract)."""
    if not stated:
        return ["states no contract version: build its Impl with "
                "contract=luce_core.plugin_api.CONTRACT_VERSION"]
    major, _, minor = stated.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        return [f"states contract version {stated!r}, not MAJOR.MINOR"]
    mine = core.partition(".")[0]
    if major != mine:
        return [f"built for luce contract {major}.x; this luce implements {core}: upgrade the plugin or luce"]
    return []


@attrs.frozen
class Impl:
    """One implementation of one role.

    requires(caps, config) returns the reasons this implementation cannot run on this machine
    with this configuration; an empty list means it can. factory is "module:attr" naming a
    callable ``(caps, config) -> role object``, imported only when the implementation is used.

    contract is the ``CONTRACT_VERSION`` the implementation was built against (state
    ``luce_core.plugin_api.CONTRACT_VERSION``); another major version, or none, is refused.

    KV pairing (see ``luce_core.contract.kv_layout``): a ``kv_storage`` implementation names in
    ``kv_layout`` the in-memory layout its stores provide through ``KVStore.tensors`` ("" =
    opaque: the generic protocol only). An ``attention`` implementation names in
    ``reads_kv_layouts`` the layouts it reads; None means it reads any store through the generic
    protocol. Selection never pairs an attention implementation with a store it cannot read.
    """

    role: str = attrs.field(validator=attrs.validators.in_(ROLES))
    name: str
    factory: str
    priority: int = 0
    requires: Callable[["Caps", "RunConfig"], list[str]] = _no_requirements
    summary: str = ""
    plugin: str = ""  # filled in by the plugin manager: which registered plugin provided it
    contract: str = ""  # the CONTRACT_VERSION it was built against
    kv_layout: str = ""  # kv_storage only: the layout its stores provide ("" = opaque)
    reads_kv_layouts: tuple[str, ...] | None = None  # attention only: layouts it reads (None = any store)

    def reasons(self, caps: "Caps", config: "RunConfig") -> list[str]:
        """Why it cannot run: a contract version other than the core's (then nothing else is
        asked: its requires() may follow another contract), else requires(), with a crash in the
        check itself turned into a reason."""
        version = contract_reasons(self.contract)
        if version:
            return version
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

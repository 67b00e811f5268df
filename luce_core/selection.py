"""Pick one implementation per role: override, filter by reasons, rank, explain.

Rules (vLLM-style): a forced implementation (CLI flag or env ``LUCE_<ROLE>``) that cannot run
is an error with its reasons, never a silent fallback; otherwise the runnable candidate with
the highest priority wins, ties broken by name so the result is deterministic; when none can
run, one error lists every candidate's reasons.

Pairing: ``kv_storage`` is selected first, and an ``attention`` implementation that cannot read
the layout of the chosen store (``Impl.reads_kv_layouts`` against ``Impl.kv_layout``) gets a
reason like any other, so no pair is built that would fall back per call, and ``luce doctor``
says why a pair was refused.
"""
from __future__ import annotations

import os
from typing import Sequence

import attrs

from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.contract.errors import SelectionError
from luce_core.contract.impl import Impl
from luce_core.contract.kv_layout import layout_name


@attrs.frozen
class Candidate:
    impl: Impl
    reasons: tuple[str, ...]
    selected: bool = False


def forced_name(role: str, config: RunConfig) -> str | None:
    """The user's forced choice for a role: config (CLI flag) first, then env LUCE_<ROLE>."""
    name = config.overrides.get(role) or os.environ.get(f"LUCE_{role.upper()}") or None
    return None if name in (None, "auto") else name


def rank(impls: Sequence[Impl]) -> list[Impl]:
    return sorted(impls, key=lambda i: (-i.priority, i.name))


def pairing_reasons(attention: Impl, kv_storage: Impl | None) -> list[str]:
    """Why ``attention`` cannot read the stores of ``kv_storage`` (empty: it can)."""
    reads = attention.reads_kv_layouts
    if kv_storage is None or reads is None or (kv_storage.kv_layout and kv_storage.kv_layout in reads):
        return []
    return [f"reads KV layouts {', '.join(reads) or '(none)'} only; kv_storage {kv_storage.name!r} "
            f"provides {layout_name(kv_storage.kv_layout)}"]


def explain(role: str, impls: Sequence[Impl], caps: Caps, config: RunConfig,
            exclude: Sequence[str] = (), kv_storage: Impl | None = None) -> list[Candidate]:
    """Every candidate in rank order with its reasons; the winner (if any) marked selected.
    For ``attention``, ``kv_storage`` is the store implementation already chosen (pairing)."""
    forced = forced_name(role, config)
    out, chosen = [], False
    for impl in rank(impls):
        reasons = impl.reasons(caps, config)
        if role == "attention":
            reasons = [*reasons, *pairing_reasons(impl, kv_storage)]
        if impl.name in exclude:
            reasons = [*reasons, "failed at first use in this process"]
        if forced is not None and impl.name != forced and not reasons:
            reasons = [f"not forced (LUCE_{role.upper()}/--{role.replace('_', '-')}={forced})"]
        win = not reasons and not chosen
        chosen |= win
        out.append(Candidate(impl, tuple(reasons), win))
    return out


def select(role: str, impls: Sequence[Impl], caps: Caps, config: RunConfig,
           exclude: Sequence[str] = (), kv_storage: Impl | None = None) -> Impl:
    """The implementation to use for ``role``; raises SelectionError with every reason."""
    forced = forced_name(role, config)
    names = [i.name for i in impls]
    if forced is not None and forced not in names:
        raise SelectionError(
            f"{role} implementation {forced!r} is not installed; known: {', '.join(sorted(names)) or 'none'}",
            remedy=f"pick one of those, or drop --{role.replace('_', '-')} / LUCE_{role.upper()}")
    cands = explain(role, impls, caps, config, exclude, kv_storage)
    for c in cands:
        if c.selected:
            return c.impl
    if forced is not None:
        why = next(c.reasons for c in cands if c.impl.name == forced)
        raise SelectionError(
            f"{role} implementation {forced!r} was forced but cannot run here: {'; '.join(why)}",
            remedy=f"drop --{role.replace('_', '-')} / LUCE_{role.upper()} to let luce choose")
    lines = "\n".join(f"    {c.impl.name}: {'; '.join(c.reasons)}" for c in cands) or "    (no candidates installed)"
    raise SelectionError(f"no {role} implementation can run here:\n{lines}",
                         remedy="see `luce doctor` for the probed capabilities")

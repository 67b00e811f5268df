"""Tree K/V relocation: after a tree verify, move the accepted path's K/V to consecutive slots."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from luce_core.contract.roles import KVStore, optional

if TYPE_CHECKING:
    from luce_core.session import Session


def exact_copy_store(kv: KVStore) -> bool:
    """True when ``read`` -> ``write`` reproduces the stored K/V bit for bit: float storage whose
    every value the compute dtype holds, and K returned unrotated."""
    spec = kv.spec
    floats = ("f32", "f16", "bf16")
    for d in (spec.k_dtype, spec.v_dtype):
        if d not in floats or not (d == spec.compute_dtype or spec.compute_dtype == "f32"):
            return False
    probe = torch.randn(1, 1, spec.head_dim, generator=torch.Generator().manual_seed(0))
    try:
        rotated = kv.rotate_query(probe.to(spec.device))
    except Exception:  # a store that cannot say: do not trust the round trip
        return False
    return bool(torch.equal(rotated.float().cpu(), probe))


def relocate(session: "Session", path: list[int], kept: list[int], n: int, exact_copy: bool) -> str | None:
    """Move the accepted nodes' K/V from slots n + path[i] to n + i (``kept`` = their tokens).
    Returns how: None (already in place), "move" (the store's byte copy), "copy" (read/write,
    when ``exact_copy``: see :func:`exact_copy_store`) or "forward" (re-run the displaced nodes)."""
    j = next((i for i, node in enumerate(path) if node != i), None)
    if j is None:
        return None
    kv, model = session.kv, session.model
    src = torch.tensor([n + p for p in path[j:]], device=model.device)
    move = optional(kv, "kv_store", "move")
    if move is not None:
        move(src, n + j)
        return "move"
    if exact_copy:
        end = n + path[-1] + 1
        for layer in range(model.cfg.n_layers):
            k, v = kv.read(layer, end)
            kv.write(layer, n + j, k[src.to(k.device)], v[src.to(v.device)])
        return "copy"
    session.forward_exact(kept[j:], n + j)  # the path's K/V as decoding would write them
    return "forward"

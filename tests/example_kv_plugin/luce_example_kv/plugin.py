"""What luce imports at start-up: the descriptor only (no torch).

The store keeps K/V its own way, so it names no in-memory layout (``kv_layout`` left ""):
luce pairs it only with attention implementations that read any store through the protocol
(the torch reference), and says so in ``luce doctor`` for the others.
"""
from __future__ import annotations

from luce_core.plugin_api import CONTRACT_VERSION, Caps, Impl, RunConfig, hookimpl

FLOATS = ("f32", "f16", "bf16")


def _requires(caps: Caps, config: RunConfig) -> list[str]:
    # float K is never rotated (the contract lets a store ignore rotation for float K)
    return [f"stores float K/V only ({'/'.join(FLOATS)}), not {side}={d}"
            for side, d in (("K", config.kv_k), ("V", config.kv_v)) if d not in FLOATS]


@hookimpl
def provide_kv_storage() -> list[Impl]:
    # priority -10: never chosen unless forced (--kv-storage example-kv / LUCE_KV_STORAGE)
    return [Impl("kv_storage", "example-kv", "luce_example_kv.store:ListKVStorage", priority=-10,
                 requires=_requires, summary="per-layer K/V tensors in a Python list (example)",
                 contract=CONTRACT_VERSION)]

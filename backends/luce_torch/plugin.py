"""Descriptors of the torch reference implementations (imports nothing heavy)."""
from __future__ import annotations

from luce_core.plugin_api import CONTRACT_VERSION, DENSE_V1, Caps, Impl, KV_DTYPES, RunConfig, hookimpl
from luce_core.formats.blocks import SUPPORTED


def _linear_requires(caps: Caps, config: RunConfig) -> list[str]:
    bad = sorted(set(config.weight_types) - set(SUPPORTED))
    return [f"cannot read tensor type(s) {', '.join(bad)}"] if bad else []


def _kv_requires(caps: Caps, config: RunConfig) -> list[str]:
    return [f"kv dtype {d} not stored" for d in sorted({config.kv_k, config.kv_v}) if d not in KV_DTYPES]


@hookimpl
def provide_linear() -> list[Impl]:
    return [Impl("linear", "torch", "luce_torch.linear:TorchLinear", priority=0,
                 requires=_linear_requires, summary="dequantize once per device/dtype, then matmul",
                 contract=CONTRACT_VERSION)]


@hookimpl
def provide_attention() -> list[Impl]:
    return [Impl("attention", "torch", "luce_torch.attention:TorchAttention", priority=0,
                 summary="causal GQA attention with optional explicit mask (SDPA)", contract=CONTRACT_VERSION)]


@hookimpl
def provide_kv_storage() -> list[Impl]:
    return [Impl("kv_storage", "torch", "luce_torch.kv:TorchKVStorage", priority=0,
                 requires=_kv_requires, summary="preallocated per-layer K/V tensors", contract=CONTRACT_VERSION,
                 kv_layout=DENSE_V1)]

"""The ``attention`` role on CUDA: flash-decode and causal flash-prefill over the KV store.

The kernels read the store's per-layer K/V tensors directly (``kv.k[layer]``, ``kv.v[layer]``
of shape [capacity, n_kv_heads, head_dim], f16 or bf16). Anything else is served by the torch
reference with one warning per cause: an explicit mask (tree verification), a store that does
not expose float tensors (quantized KV), a head_dim without a kernel, or an f32 cache.
"""
from __future__ import annotations

import warnings

import torch

from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.roles import KVStore
from luce_cuda import ops


class CudaAttention:
    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        self._ref = None
        self._warned: set[str] = set()
        self._ws: dict[tuple, ops.DecodeWorkspace] = {}

    def _reference(self):
        if self._ref is None:
            from luce_torch.attention import TorchAttention

            self._ref = TorchAttention()
        return self._ref

    def _fallback(self, why: str, q, kv, layer, start, scale, mask):
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"luce_cuda attention: {why}; using the torch reference for these calls", stacklevel=3)
        return self._reference().forward(q, kv, layer, start, scale=scale, mask=mask)

    def kernel_reasons(self, q: torch.Tensor, kv: KVStore) -> list[str]:
        k = getattr(kv, "k", None)
        v = getattr(kv, "v", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)) or k.dim() != 4:
            return [f"KV store {type(kv).__name__} exposes no [layers, capacity, heads, dim] K/V tensors"]
        if not q.is_cuda or not k.is_cuda:
            return ["tensors are not on a CUDA device"]
        if k.dtype != v.dtype:
            return [f"K and V dtypes differ ({k.dtype}, {v.dtype})"]
        if q.dtype not in ops.DT_CODE:
            return [f"query dtype {q.dtype}"]
        return ops.attention_supported(int(k.shape[-1]), k.dtype)

    def forward(self, q: torch.Tensor, kv: KVStore, layer: int, start: int, *,
                scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            return self._fallback("explicit attention masks are computed by the reference", q, kv, layer, start,
                                  scale, mask)
        why = self.kernel_reasons(q, kv)
        if why:
            return self._fallback("; ".join(why), q, kv, layer, start, scale, mask)
        q = kv.rotate_query(q)
        k, v = kv.k[layer], kv.v[layer]  # type: ignore[attr-defined]
        t = q.shape[0]
        if t == 1:
            key = (q.shape[1], q.shape[2], k.shape[0], q.device)
            ws = self._ws.get(key)
            if ws is None:
                ws = self._ws[key] = ops.DecodeWorkspace(q.shape[1], q.shape[2], k.shape[0], q.device)
            return ops.flash_decode(q, k, v, start + 1, scale, workspace=ws)
        return ops.flash_prefill(q, k, v, start, scale)

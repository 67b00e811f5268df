"""A KV store following ``luce_core.plugin_api.KVStore``, none of its optional members.

Each layer holds its own K and V tensors ``[capacity, n_kv_heads, head_dim]`` in the stored float
dtype (a list of per-layer pairs, not luce's dense [layers, ...] tensors). K is never rotated
(rotation only pays for block-quantized K), so ``rotate_query`` is the identity.
"""
from __future__ import annotations

from typing import Any

import torch

from luce_core.plugin_api import Caps, ContextOverflowError, KVSpec, RunConfig, SnapshotError

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class ListKVStore:
    def __init__(self, spec: KVSpec):
        self.spec = spec
        self.length = 0
        self._compute = DTYPES[spec.compute_dtype]
        shape = (spec.capacity, spec.n_kv_heads, spec.head_dim)
        self._layers = [(torch.zeros(shape, dtype=DTYPES[spec.k_dtype], device=spec.device),
                         torch.zeros(shape, dtype=DTYPES[spec.v_dtype], device=spec.device))
                        for _ in range(spec.n_layers)]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[0]
        if start < 0 or start + t > self.spec.capacity:
            raise ContextOverflowError(f"KV write of [{start}, {start + t}) exceeds {self.spec.capacity}",
                                       remedy="raise --ctx")
        lk, lv = self._layers[layer]
        lk[start:start + t] = k
        lv[start:start + t] = v

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        lk, lv = self._layers[layer]
        return lk[:end].to(self._compute), lv[:end].to(self._compute)

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def set_length(self, n: int) -> None:
        if not 0 <= n <= self.spec.capacity:
            raise ContextOverflowError(f"KV length {n} outside [0, {self.spec.capacity}]", remedy="raise --ctx")
        self.length = n

    def snapshot(self) -> Any:
        n = self.length
        return {"store": "example-kv", "length": n,
                "layers": [(k[:n].clone(), v[:n].clone()) for k, v in self._layers]}

    def restore(self, snap: Any) -> None:
        if not (isinstance(snap, dict) and snap.get("store") == "example-kv"):
            raise SnapshotError("not a snapshot of the example-kv store", remedy="restore what snapshot() returned")
        n = snap["length"]
        for (k, v), (sk, sv) in zip(self._layers, snap["layers"]):
            k[:n].copy_(sk)
            v[:n].copy_(sv)
        self.length = n

    @property
    def bytes_per_token(self) -> int:
        return sum(k[0].nbytes + v[0].nbytes for k, v in self._layers)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._layers)


class ListKVStorage:
    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        pass

    def allocate(self, spec: KVSpec) -> ListKVStore:
        return ListKVStore(spec)

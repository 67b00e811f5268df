"""Reference KV storage: preallocated per-layer K/V tensors in a float dtype."""
from __future__ import annotations

import torch

from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.errors import ConfigError
from luce_core.roles import KVSpec

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class TorchKVStore:
    def __init__(self, spec: KVSpec):
        for d in (spec.k_dtype, spec.v_dtype):
            if d not in TORCH_DTYPES:
                raise ConfigError(f"kv dtype {d} is not stored by the torch KV store")
        self.spec = spec
        self.length = 0
        shape = (spec.n_layers, spec.capacity, spec.n_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=TORCH_DTYPES[spec.k_dtype], device=spec.device)
        self.v = torch.zeros(shape, dtype=TORCH_DTYPES[spec.v_dtype], device=spec.device)
        self._compute = TORCH_DTYPES[spec.compute_dtype]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer, start:start + k.shape[0]] = k
        self.v[layer, start:start + v.shape[0]] = v

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :end].to(self._compute), self.v[layer, :end].to(self._compute)

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def set_length(self, n: int) -> None:
        self.length = n

    def snapshot(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        n = self.length
        return n, self.k[:, :n].clone(), self.v[:, :n].clone()

    def restore(self, snap: tuple[int, torch.Tensor, torch.Tensor]) -> None:
        n, k, v = snap
        self.k[:, :n] = k
        self.v[:, :n] = v
        self.length = n

    @property
    def bytes_per_token(self) -> int:
        s = self.spec
        return s.n_layers * s.n_kv_heads * s.head_dim * (self.k.element_size() + self.v.element_size())

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class TorchKVStorage:
    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        pass

    def allocate(self, spec: KVSpec) -> TorchKVStore:
        return TorchKVStore(spec)

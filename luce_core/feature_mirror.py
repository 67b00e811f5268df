"""The DFlash feature mirror: per-position target hidden states the drafter conditions on.

Each position holds one row of ``width = n_capture_layers * hidden`` features. The mirror is a
KV store allocated through the ``kv_storage`` role (so a CUDA store, or a third-party one, serves
it too): one layer, one head, the first half of the row in K and the second half in V, no
rotation, compute dtype f32. Its dtype policy (``RunConfig.feature_dtype``):

* ``f32`` (default): lossless;
* ``f16`` / ``bf16``: half the memory, rounding per element;
* ``q8_0``: ggml Q8_0 blocks of 32 consecutive features (``width/32*34`` bytes per position,
  about 0.27 of f32); ``width`` must be a multiple of 32.

Reads come back as f32 on the mirror's device; the conversion runs there (no host round trip).
Memory is exactly ``capacity * feature_bytes_per_token(width, dtype)`` (see luce_core.formats.blocks:
when the row does not split into two whole-block halves, the V half carries one zero block).
"""
from __future__ import annotations

import os

import torch

from luce_core.config import FEATURE_DTYPES
from luce_core.contract.errors import ConfigError, ContextOverflowError
from luce_core.formats.blocks import feature_bytes_per_token, feature_split
from luce_core.contract.roles import KVStorage, KVStore, optional
from luce_core.contract.types import KVSpec


class FeatureMirror:
    def __init__(self, kv_storage: KVStorage, capacity: int, width: int, dtype: str = "f32",
                 device: str | torch.device = "cpu", fingerprint: str = ""):
        if dtype not in FEATURE_DTYPES:
            raise ConfigError(f"feature dtype {dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
        if width <= 0 or capacity <= 0:
            raise ConfigError(f"feature mirror needs a positive width and capacity, got {width} and {capacity}")
        if dtype == "q8_0" and width % 32:
            raise ConfigError(f"feature dtype q8_0 stores blocks of 32 features, but the feature width "
                              f"is {width} (not a multiple of 32)",
                              remedy="use --feature-dtype f32, f16 or bf16 for this model")
        self.width, self.dtype, self.capacity = width, dtype, capacity
        self.device = torch.device(device)
        self.half = feature_split(width, dtype)
        spec = KVSpec(n_layers=1, n_kv_heads=1, head_dim=self.half, capacity=capacity,
                      k_dtype=dtype, v_dtype=dtype, rotation=False, device=str(self.device),
                      compute_dtype="f32", fingerprint=fingerprint)
        self.store: KVStore = kv_storage.allocate(spec)

    @property
    def length(self) -> int:
        return self.store.length

    def set_length(self, n: int) -> None:
        self.store.set_length(n)

    def write(self, start: int, feats: torch.Tensor) -> None:
        """Store rows ``feats`` ([T, width], any float dtype) at positions [start, start+T)."""
        if feats.dim() != 2 or feats.shape[1] != self.width:
            raise ValueError(f"features must be [T, {self.width}], got {list(feats.shape)}")
        x = feats.to(self.device, torch.float32)
        pad = 2 * self.half - self.width
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        self.store.write(0, start, x[:, None, : self.half], x[:, None, self.half:])

    def read(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) as f32 [end-start, width] on the mirror's device."""
        if not 0 <= start <= end <= self.capacity:
            raise ContextOverflowError(f"feature read [{start}, {end}) is outside [0, {self.capacity})",
                                       remedy="raise --ctx")
        read_range = optional(self.store, "kv_store", "read_range")
        if read_range is not None:
            k, v = read_range(0, start, end)
        else:  # any KVStore: decode the prefix, keep the tail
            k, v = self.store.read(0, end)
            k, v = k[start:], v[start:]
        out = torch.cat([k[:, 0], v[:, 0]], dim=-1)[:, : self.width]
        return out.to(torch.float32)

    def snapshot(self):
        return self.store.snapshot()

    def restore(self, snap) -> None:
        self.store.restore(snap)

    def save(self, path: str | os.PathLike[str]) -> None:
        from luce_core.formats import kv_snapshot
        kv_snapshot.save(self.store.snapshot(), path)

    def load(self, path: str | os.PathLike[str]) -> None:
        from luce_core.formats import kv_snapshot
        self.store.restore(kv_snapshot.load(path))

    @property
    def bytes_per_token(self) -> int:
        return feature_bytes_per_token(self.width, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def describe(self) -> str:
        """The startup log line: dtype, capacity, width and the memory actually held."""
        return (f"feature mirror dtype={self.dtype} cap={self.capacity} width={self.width} "
                f"bytes={self.nbytes} ({self.nbytes / 2**20:.1f} MiB)")

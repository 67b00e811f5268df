"""Reference KV storage: preallocated per-layer K/V tensors, float or ggml-block quantized.

K and V are stored independently as f32, f16, bf16 (tensors of that dtype) or q8_0, q4_0 (uint8
tensors holding ggml blocks of each head's ``head_dim`` vector; quantized on write, dequantized
on read). Shapes: ``[n_layers, capacity, n_kv_heads, head_dim]`` for floats and
``[n_layers, capacity, n_kv_heads, row_bytes]`` for blocks.

The tensors are the ``dense-v1`` layout of ``luce_core.contract.kv_layout``, handed out as
``tensors`` (what the CUDA attention reads).

Rotation: with ``spec.rotation`` and a quantized K, K is Hadamard-rotated (after RoPE, which the
model applies before ``write``) and then quantized; ``read`` returns K in that rotated basis and
``rotate_query`` moves queries into it, so attention scores are unchanged. For a float K the flag
is ignored: float rounding is relative to each element, so there are no shared block scales for an
outlier to spoil and the rotation would only cost time.
"""
from __future__ import annotations

import os

import torch

from luce_core.formats import kv_snapshot
from luce_core.plugin_api import (DENSE_V1, Caps, ConfigError, ContextOverflowError, KVSpec, KVTensors, RunConfig,
                                  SnapshotError)
from luce_core.formats.blocks import KV_BLOCKS, QUANTIZED, kv_bytes_per_token, vector_bytes
from luce_core.formats.kv_snapshot import KVLayout, KVSnapshot
from luce_core.formats.hadamard import DEFAULT_SEED, Hadamard
from luce_core.formats.kv_blocks import DEQUANTIZE, QUANTIZE

from luce_core.formats.dtypes import TORCH_DTYPES


def _encode(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return QUANTIZE[dtype](x) if dtype in QUANTIZED else x.to(TORCH_DTYPES[dtype])


def _decode(stored: torch.Tensor, dtype: str, out: torch.dtype) -> torch.Tensor:
    return (DEQUANTIZE[dtype](stored) if dtype in QUANTIZED else stored).to(out)


class TorchKVStore:
    def __init__(self, spec: KVSpec):
        for side, d in (("k", spec.k_dtype), ("v", spec.v_dtype)):
            if d not in KV_BLOCKS:
                raise ConfigError(f"kv {side} dtype {d!r} is not stored by the torch KV store",
                                  remedy=f"use one of {', '.join(KV_BLOCKS)}")
        if spec.compute_dtype not in TORCH_DTYPES:
            raise ConfigError(f"compute dtype {spec.compute_dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
        self.spec = spec
        self.length = 0
        self._compute = TORCH_DTYPES[spec.compute_dtype]
        self.rotated = bool(spec.rotation) and spec.k_dtype in QUANTIZED
        self.hadamard = Hadamard(spec.head_dim, DEFAULT_SEED) if self.rotated else None
        self.k = self._alloc(spec.k_dtype)
        self.v = self._alloc(spec.v_dtype)
        # byte views of the same memory: what snapshots copy, whatever the dtype
        self._k_raw = self.k.view(torch.uint8)
        self._v_raw = self.v.view(torch.uint8)
        h = self.hadamard
        self.tensors = KVTensors(self.k, self.v, spec.k_dtype, spec.v_dtype, h.group if h else 0,
                                 h.signs(self.k.device) if h else None, DENSE_V1)

    def _alloc(self, dtype: str) -> torch.Tensor:
        s = self.spec
        lead = (s.n_layers, s.capacity, s.n_kv_heads)
        if dtype in QUANTIZED:
            return torch.zeros((*lead, vector_bytes(s.head_dim, dtype)), dtype=torch.uint8, device=s.device)
        return torch.zeros((*lead, s.head_dim), dtype=TORCH_DTYPES[dtype], device=s.device)

    # ------------------------------------------------------------------ KVStore protocol
    def _check_write(self, k: torch.Tensor, v: torch.Tensor, start: int | None) -> None:
        """k, v must be [T, n_kv_heads, head_dim]; slots [start, start+T) must fit (when given)."""
        s = self.spec
        want = (s.n_kv_heads, s.head_dim)
        if k.dim() != 3 or tuple(k.shape[1:]) != want or tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"write expects k, v of shape [T, {want[0]}, {want[1]}], "
                             f"got {list(k.shape)} and {list(v.shape)}")
        if start is not None:
            self._check_slots(start, k.shape[0])

    def _check_slots(self, start: int, T: int) -> None:
        """Slots [start, start+T) must fit the capacity."""
        if start < 0 or start + T > self.spec.capacity:
            raise ContextOverflowError(f"KV write of positions [{start}, {start + T}) exceeds the "
                                       f"capacity of {self.spec.capacity}", remedy="raise --ctx")

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_write(k, v, start)
        s = self.spec
        T = k.shape[0]
        if self.hadamard is not None:
            k = self.hadamard.rotate(k.to(torch.float32))
        self.k[layer, start:start + T] = _encode(k, s.k_dtype)
        self.v[layer, start:start + T] = _encode(v, s.v_dtype)

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """write() with the slots given as a device tensor [T]: no host sync, so a decode step
        that uses it can be captured in a CUDA graph. Slots are not range-checked here."""
        if self.hadamard is not None:
            k = self.hadamard.rotate(k.to(torch.float32))
        self.k[layer].index_copy_(0, pos, _encode(k, self.spec.k_dtype))
        self.v[layer].index_copy_(0, pos, _encode(v, self.spec.v_dtype))

    def move(self, src: torch.Tensor, dst: int) -> None:
        """Copy the stored rows of slots ``src`` (int64 [n]) to [dst, dst+n) in every layer, bytes
        as they are (exact for every format, rotated K too). Overlaps are fine: rows are gathered
        before they are written."""
        n = int(src.shape[0])
        self._check_slots(dst, n)
        idx = src.to(self.k.device)
        for t in (self.k, self.v):
            t[:, dst:dst + n] = t[:, idx]

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read_range(layer, 0, end)

    def read_range(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [start, end) in compute dtype (a view when no conversion is needed)."""
        s = self.spec
        return (_decode(self.k[layer, start:end], s.k_dtype, self._compute),
                _decode(self.v[layer, start:end], s.v_dtype, self._compute))

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.hadamard is None else self.hadamard.rotate(q)

    def unrotate_key(self, k: torch.Tensor) -> torch.Tensor:
        """K as read() returns it, back in the model's basis (for K-shift or inspection)."""
        return k if self.hadamard is None else self.hadamard.unrotate(k)

    def set_length(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"KV length must be >= 0, got {n}")
        if n > self.spec.capacity:
            raise ContextOverflowError(f"KV length {n} exceeds the capacity of {self.spec.capacity}",
                                       remedy="raise --ctx")
        self.length = n

    # ------------------------------------------------------------------ snapshots
    @property
    def layout(self) -> KVLayout:
        s, h = self.spec, self.hadamard
        return KVLayout(s.k_dtype, s.v_dtype, self.rotated, h.seed if h else 0, h.group if h else 0,
                        s.n_layers, s.n_kv_heads, s.head_dim, s.fingerprint)

    def snapshot(self) -> KVSnapshot:
        """Host-memory copy of the packed bytes of positions [0, length)."""
        n = self.length

        def host(raw: torch.Tensor):
            return raw[:, :n].to("cpu", copy=True).contiguous().numpy()

        return KVSnapshot(self.layout, n, host(self._k_raw), host(self._v_raw))

    def restore(self, snap: KVSnapshot) -> None:
        if not isinstance(snap, KVSnapshot):
            raise SnapshotError(f"cannot restore a {type(snap).__name__} into a KV store",
                                remedy="pass what snapshot() or luce_core.formats.kv_snapshot.load() returned")
        kv_snapshot.check_restorable(snap, self.layout, self.spec.capacity)
        n = snap.length
        self._k_raw[:, :n].copy_(torch.from_numpy(snap.k))
        self._v_raw[:, :n].copy_(torch.from_numpy(snap.v))
        self.length = n

    def save(self, path: str | os.PathLike[str]) -> None:
        kv_snapshot.save(self.snapshot(), path)

    def load(self, path: str | os.PathLike[str]) -> None:
        self.restore(kv_snapshot.load(path))

    # ------------------------------------------------------------------ memory
    @property
    def bytes_per_token(self) -> int:
        s = self.spec
        return kv_bytes_per_token(s.n_layers, s.n_kv_heads, s.head_dim, s.k_dtype, s.v_dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class TorchKVStorage:
    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        pass

    def allocate(self, spec: KVSpec) -> TorchKVStore:
        return TorchKVStore(spec)

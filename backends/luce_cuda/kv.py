"""The ``kv_storage`` role on CUDA: luce_torch's store layout, written by one fused kernel per call.

:class:`CudaKVStore` keeps :class:`luce_torch.kv.TorchKVStore`'s tensors exactly (so the torch and
the CUDA attention read them unchanged, and snapshots move between the two stores); only
``write`` and ``write_at`` differ: one launch of ``kv_append`` (kernels/kv_append.cu) stores K and
V of all T tokens. Per (token, head) vector: for K of a rotated store, the ±1 signs and the
grouped Walsh-Hadamard butterflies in f32 in ``hadamard.fwht``'s order; then a cast to
f32/f16/bf16 or ggml Q8_0/Q4_0 packing with ggml's arithmetic (f32 ``d``, IEEE reciprocal of it,
no FMA contraction); then the store into the slot. Reads, snapshots, ``rotate_query`` and memory
accounting are inherited.

Bytes: identical to the torch store on the CPU (which is byte-identical to gguf). On a CUDA
device the torch store's Q8_0 ``d`` can differ by one f32 ulp, because torch divides by a Python
scalar on CUDA as a multiply by its reciprocal; this kernel divides, as ggml does.

``write_at`` reads its slots from a device tensor and takes no host sync, so a decode step using
it is capturable in a CUDA graph; the kernel is loaded when the store is allocated, before any
capture. Slots outside [0, capacity) are skipped by the kernel (never written out of bounds).
Sources the kernel does not read (not f16/bf16/f32, another device, head_dim over
``programs.KV_MAX_DIM``) are written by the inherited torch path.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from luce_core.plugin_api import Caps, ConfigError, KVSpec, RunConfig
from luce_cuda import programs
from luce_cuda.launch import device_index, get_kernel, launch
from luce_torch.kv import TorchKVStore

if TYPE_CHECKING:
    from luce_cuda.linear import RopeStore

FMT = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4}  # kv_append.cu KV_*
FLOAT = ("f32", "f16", "bf16")  # the formats a GEMV epilogue stores (kernels/gemv.cu RopeStore)
SRC = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # kv_append.cu SRC_* (= ops.DT_CODE)
KERNEL = "kv_append"
# write_rotary serves decode and verify steps up to this many tokens. A prefill chunk keeps
# rope_qk + append: the fused grid's blocks per query head were slower there (SmolLM2 pp4096
# 185 055 against 210 664 tok/s on an H200).
ROTARY_MAX_T = 32


def warmup(device: torch.device | str | int = 0) -> None:
    """Load the append kernel on ``device`` (before any CUDA-graph capture)."""
    get_kernel(programs.KV_APPEND, KERNEL, device_index(device))


class CudaKVStore(TorchKVStore):
    def __init__(self, spec: KVSpec):
        if torch.device(spec.device).type != "cuda":
            raise ConfigError(f"the CUDA KV store cannot live on device {spec.device!r}",
                              remedy="allocate it on a CUDA device, or use the torch store (--kv-storage torch)")
        super().__init__(spec)
        self._device = self.k.device
        self._kfmt, self._vfmt = np.int32(FMT[spec.k_dtype]), np.int32(FMT[spec.v_dtype])
        self._fused = spec.head_dim <= programs.KV_MAX_DIM
        h = self.hadamard
        self._signs = h.signs(self._device) if h is not None else None
        self._group = np.int32(h.group if h is not None else 0)
        # torch multiplies f32 by the Python float 1/sqrt(g) rounded to f32: the same factor
        self._scale = np.float32(1.0 / math.sqrt(h.group) if h is not None else 1.0)
        self._threads = min(128, max(32, -(-spec.head_dim // 32) * 32))
        if self._fused:
            warmup(self._device)

    # ------------------------------------------------------------------ writes
    def _kernel_reads(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        return (self._fused and k.dtype in SRC and v.dtype in SRC
                and k.device == self._device and v.device == self._device)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self._kernel_reads(k, v):
            return super().write(layer, start, k, v)
        self._check_write(k, v, start)
        self._append(layer, None, int(start), k, v)

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """write() with the slots given as a device tensor [T]: no host sync (CUDA-graph
        capturable). Slots outside [0, capacity) are skipped, not written."""
        if not (self._kernel_reads(k, v) and pos.device == self._device):
            return super().write_at(layer, pos, k, v)
        self._check_write(k, v, None)
        if pos.shape != (k.shape[0],):
            raise ValueError(f"write_at expects pos of shape [{k.shape[0]}], got {list(pos.shape)}")
        if pos.dtype != torch.int64:
            pos = pos.to(torch.int64)
        self._append(layer, pos, 0, k, v)

    def write_rotary(self, layer: int, slots: int | torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, style: str) -> bool:
        """RoPE and the append in one launch: rotate q [T, Hq, D] in place and k [T, H, D] by the
        f32 tables cos/sin [max_pos, rope_dim/2] at ``positions`` (int64 device tensor [T]), then
        store k and v at ``slots`` (start int, as ``write``; or a device tensor, as ``write_at``).
        Bit for bit ``ops.rope_qk`` followed by ``write``. Returns False, having done nothing,
        when the kernel cannot serve the call (or T > ROTARY_MAX_T); the caller then rotates and
        writes separately."""
        T = k.shape[0]
        if not (self._kernel_reads(k, v) and q.dtype == k.dtype and q.device == self._device
                and q.dim() == 3 and q.stride(-1) == 1 and q.shape[0] == T and q.shape[2] == k.shape[2]
                and style in ("normal", "neox") and self._rotary_reads(T, cos, sin, positions, slots, k.shape[2])):
            return False
        tensor = isinstance(slots, torch.Tensor)
        self._check_write(k, v, None if tensor else int(slots))
        pos, start = (slots.to(torch.int64), 0) if tensor else (None, int(slots))  # .to: a no-op on int64
        self._append(layer, pos, start, k, v, rope=(q, positions.to(torch.int64), cos, sin, style))
        return True

    def rope_store_args(self, layer: int, slots: int | torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, style: str, nq: int, dtype: torch.dtype) -> "RopeStore | None":
        """What a QKV GEMV needs to store this layer's k and v itself (luce_cuda.linear.RopeStore,
        q heads nq wide, activations ``dtype``), checked as ``write_rotary`` checks its call; None
        where only the append kernel can write them: a quantized or rotated K, a quantized V,
        neox RoPE (its pairs are not a GEMV row group), tables or slots it cannot read."""
        from luce_cuda.linear import RopeStore

        s = self.spec
        T = positions.shape[0]
        tensor = isinstance(slots, torch.Tensor)
        # the GEMV reads positions and slots as they are: int64 only (write_rotary converts them)
        if not (self._fused and self.hadamard is None and s.k_dtype in FLOAT and s.v_dtype in FLOAT
                and dtype in SRC and style == "normal" and positions.dtype == torch.int64
                and (not tensor or slots.dtype == torch.int64)
                and self._rotary_reads(T, cos, sin, positions, slots, s.head_dim)):
            return None
        if not tensor:  # write()'s range check
            self._check_slots(int(slots), T)
        return RopeStore(positions, slots if tensor else None, 0 if tensor else int(slots), cos, sin,
                         self.k[layer], self.v[layer], int(self._kfmt), int(self._vfmt), s.capacity, nq,
                         s.n_kv_heads * s.head_dim, s.head_dim)

    def _rotary_reads(self, T: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                      slots: int | torch.Tensor, head_dim: int) -> bool:
        """Whether a fused RoPE kernel can read this call's tables, positions and slots: a decode
        or verify step (T <= ROTARY_MAX_T), contiguous f32 tables on this device covering at most
        head_dim channels, positions (and slot tensors) of T entries on this device."""
        return (T <= ROTARY_MAX_T and cos.dtype == torch.float32 and sin.dtype == torch.float32
                and cos.is_contiguous() and sin.is_contiguous() and cos.device == self._device
                and 2 * cos.shape[-1] <= head_dim and positions.shape == (T,) and positions.device == self._device
                and (not isinstance(slots, torch.Tensor) or (slots.shape == (T,) and slots.device == self._device)))

    def _append(self, layer: int, pos: torch.Tensor | None, start: int, k: torch.Tensor, v: torch.Tensor,
                rope: tuple | None = None) -> None:
        T, H, D = k.shape
        if T == 0:
            return
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        kd, vd = self.k[layer], self.v[layer]  # [capacity, H, row] views of this layer
        if rope is None:
            q, rp, cos, sin, hq, half, neox, ys = None, None, None, None, 0, 0, 0, 2
        else:
            q, rp, cos, sin, style = rope
            hq, half, neox, ys = q.shape[1], cos.shape[-1], int(style == "neox"), 3
        launch(get_kernel(programs.KV_APPEND, KERNEL, self._device.index), (T * max(H, hq), ys), (self._threads,),
               (k, v, np.int32(SRC[k.dtype]), np.int32(SRC[v.dtype]), np.int64(k.stride(0)), np.int64(k.stride(1)),
                np.int64(v.stride(0)), np.int64(v.stride(1)), kd, vd, self._kfmt, self._vfmt, pos, np.int64(start),
                np.int64(self.spec.capacity), np.int32(T), np.int32(H), np.int32(D), self._signs, self._group,
                self._scale, q, np.int64(q.stride(0) if q is not None else 0),
                np.int64(q.stride(1) if q is not None else 0), np.int32(hq), rp, cos, sin, np.int32(half),
                np.int32(neox)), like=k, shmem=4 * D)


class CudaKVStorage:
    """Factory of the ``kv_storage`` role "cuda": loads the kernel on creation (a compile or load
    failure there lets luce fall back to the torch store), then allocates CudaKVStores."""

    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        if torch.cuda.is_available():
            warmup(torch.cuda.current_device())

    def allocate(self, spec: KVSpec) -> CudaKVStore:
        return CudaKVStore(spec)

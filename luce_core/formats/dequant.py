"""ggml block formats -> float32, in torch, on whatever device the bytes live.

Bit-exact with ``gguf.quants.dequantize``: every product and sum is a separate float32 torch op
in the same order as gguf's numpy code, so each intermediate is rounded exactly where gguf rounds
it (one fused kernel could contract a*b+c into an FMA and differ in the last bit).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch

from luce_core.contract.errors import ModelFileError, UnsupportedModelError
from luce_core.formats.blocks import BLOCKS, SUPPORTED
from luce_core.contract.types import QTensor

QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two-byte columns of ``b`` ([n, 2]) as float32 [n, 1] (fp16 -> f32 is exact)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return qs & 0x0F, qs >> 4


def _float_view(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = raw.contiguous().reshape(-1)
    try:
        return flat.view(dtype)
    except RuntimeError:  # storage offset not a multiple of the element size: copy to realign
        return flat.clone().view(dtype)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    x = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    lo, hi = _nibbles(b[:, 2:])
    q = torch.cat([lo, hi], dim=1).to(torch.float32) - 8.0  # small ints: exact
    return d * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    m = _f16(b[:, 2:4])
    lo, hi = _nibbles(b[:, 4:])
    q = torch.cat([lo, hi], dim=1).to(torch.float32)
    return (d * q) + m


def q4_k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 scale bytes of Q4_K blocks ([n, 12] uint8) into 6-bit sc, mn ([n, 8])."""
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    sc, mn = q4_k_scale_min(b[:, 4:16])
    ds = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    # 4 chunks of 32 bytes; chunk c: sub-block 2c in low nibbles, 2c+1 in high nibbles
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).to(torch.float32)
    return (ds * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(b[:, 208:210])
    ds = (d * sc).reshape(n, 16, 1)
    # element h*128 + k*64 + j: low 4 bits in nibble k of ql[h*64 + j]
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 128)
    # element h*128 + k*32 + j: high 2 bits in bits 2k..2k+1 of qh[h*32 + j]
    high = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(n, 2, 128)
    q = (low | (high << 4)).to(torch.float32) - 32.0
    return (ds * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _ue4m3_table() -> torch.Tensor:
    """Value of each UE4M3 scale byte as ggml reads it: bias 7, 3 mantissa bits, the top bit
    ignored, and 0x7F (the E4M3 NaN) read as 0."""
    vals = []
    for code in range(256):
        e, m = (code >> 3) & 15, code & 7
        v = m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        vals.append(0.0 if code == 0x7F else v)
    return torch.tensor(vals, dtype=torch.float32)


# E2M1 codes 0-7 and their negatives (bit 3 = sign); code 8 is +0 as in ggml's integer table
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_TABLE = torch.tensor(E2M1 + (0.0,) + tuple(-v for v in E2M1[1:]), dtype=torch.float32)
UE4M3_TABLE = _ue4m3_table()
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    key = (name, device)
    if key not in _TABLES:
        _TABLES[key] = (UE4M3_TABLE if name == "ue4m3" else _E2M1_TABLE).to(device)
    return _TABLES[key]


def _nvfp4(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    # products of a <=4-bit-mantissa scale and an E2M1 value are exact in float32, so this
    # agrees bit for bit with ggml's doubled-kvalues / halved-scale formulation
    d = _table("ue4m3", b.device)[b[:, 0:4].to(torch.int32)].reshape(n, 4, 1)
    qs = b[:, 4:].reshape(n, 4, 8)
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=2)  # sub-block s: qs[j] = v[j] | v[j+8] << 4
    v = _table("e2m1", b.device)[codes.to(torch.int32)]
    return (d * v).reshape(n, 64)


_BLOCK_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k, "NVFP4": _nvfp4,
}


def _unsupported(qtype: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"tensor type {qtype} is not supported by luce's dequantizer",
                                 remedy=f"use a model whose tensors are {', '.join(SUPPORTED)}")


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw ggml bytes (uint8, [rows, row_bytes] or flat) -> float32 ``shape`` on raw's device."""
    if qtype not in BLOCKS:
        raise _unsupported(qtype)
    elems, nbytes = BLOCKS[qtype]
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw bytes must be uint8, got {raw.dtype}")
    if shape and shape[-1] % elems:
        raise UnsupportedModelError(f"{qtype} rows must be a multiple of {elems} elements, got shape {shape}",
                                    remedy="re-quantize the model with a type whose block fits the row length")
    if raw.numel() != n // elems * nbytes or n % elems:
        raise ModelFileError(f"{qtype} tensor of shape {shape} needs {n // elems * nbytes} bytes, got {raw.numel()}",
                             remedy="the model file is truncated or corrupt; download it again")
    if qtype == "F32":
        return _float_view(raw, torch.float32).reshape(shape)
    if qtype == "F16":
        return _float_view(raw, torch.float16).to(torch.float32).reshape(shape)
    if qtype == "BF16":
        return _float_view(raw, torch.bfloat16).to(torch.float32).reshape(shape)
    blocks = raw.reshape(-1, nbytes)
    return _BLOCK_DEQUANT[qtype](blocks).reshape(shape)


def qtensor_bytes(w: QTensor, device: torch.device | str | None = None) -> torch.Tensor:
    """The raw bytes of ``w`` as a uint8 torch tensor on ``device``, sharing memory on the CPU."""
    data = w.data
    if not isinstance(data, np.ndarray):
        data = np.asarray(data)
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    data = data.view(np.uint8)
    with warnings.catch_warnings():
        # memmaps are read-only; torch warns because writing through the tensor would be
        # undefined. Nothing here writes to it: dequantization only reads.
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        raw = torch.from_numpy(data)
    return raw if device is None else raw.to(device)


def dequantize_qtensor(w: QTensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``w`` as float32 of ``w.shape`` on ``device`` (the bytes move, then dequantize there),
    times the per-tensor ``w.scale`` (NVFP4's second-level scale) when it is not 1. An F32
    tensor left on the CPU is a view of ``w.data`` (no copy): clone it before writing to it."""
    if w.qtype not in BLOCKS:
        raise _unsupported(w.qtype)
    out = dequantize(qtensor_bytes(w, device), w.qtype, w.shape)
    if w.scale != 1.0:
        out = out * float(w.scale)
    return out

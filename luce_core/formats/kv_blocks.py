"""ggml Q8_0 / Q4_0 block packing in torch, bit-exact with ``gguf.quants`` (and so with ggml).

Rows are quantized along the last dimension in 32-element blocks:

* Q8_0 block (34 bytes): fp16 ``d = amax/127``, then 32 int8 ``round(x/d)`` (half away from zero).
* Q4_0 block (18 bytes): fp16 ``d = m/-8`` where ``m`` is the signed element of largest magnitude
  (first one on ties), then 16 bytes: byte ``j`` holds element ``j`` in its low nibble and element
  ``j+16`` in its high nibble, each ``clip(trunc(x/d + 8.5), 0, 15)``; it decodes as ``d*(q-8)``.

The reciprocal is computed from the f32 ``d`` before it is rounded to fp16, exactly as ggml does;
that is why the arithmetic below is spelled out step by step. Everything is elementwise torch on
the input's device (no host round trip, no loops over rows). Inputs must be finite.
"""
from __future__ import annotations

import torch

from luce_core.formats.ggml_math import fp16_bytes, round_half_away

QK = 32  # elements per block for both formats


def _blocks(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    if n % QK:
        raise ValueError(f"row length {n} is not a multiple of {QK}")
    return x.to(torch.float32).reshape(*x.shape[:-1], n // QK, QK)


def _safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """[..., n] float -> [..., n/32*34] uint8 Q8_0 blocks."""
    b = _blocks(x)
    amax = b.abs().amax(dim=-1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)  # tensor / tensor: CUDA turns "/ 127" into "* (1/127)", 1 ulp off
    q = round_half_away(b * _safe_reciprocal(d)).to(torch.int8).view(torch.uint8)
    out = torch.cat([fp16_bytes(d), q], dim=-1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * 34)


def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    """[..., nb*34] uint8 -> [..., nb*32] f32."""
    b = raw.reshape(*raw.shape[:-1], raw.shape[-1] // 34, 34)
    d = _fp16_from_bytes(b[..., :2])
    q = b[..., 2:].contiguous().view(torch.int8).to(torch.float32)
    return (q * d).reshape(*raw.shape[:-1], raw.shape[-1] // 34 * QK)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """[..., n] float -> [..., n/32*18] uint8 Q4_0 blocks."""
    b = _blocks(x)
    imax = b.abs().argmax(dim=-1, keepdim=True)  # first index of the largest magnitude
    d = torch.gather(b, -1, imax) / -8
    q = torch.trunc(b * _safe_reciprocal(d) + 8.5).clamp(0, 15).to(torch.uint8)
    packed = q[..., : QK // 2] | (q[..., QK // 2:] << 4)
    out = torch.cat([fp16_bytes(d), packed], dim=-1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * 18)


def dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    """[..., nb*18] uint8 -> [..., nb*32] f32."""
    b = raw.reshape(*raw.shape[:-1], raw.shape[-1] // 18, 18)
    d = _fp16_from_bytes(b[..., :2])
    qs = b[..., 2:]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).to(torch.float32) - 8
    return (q * d).reshape(*raw.shape[:-1], raw.shape[-1] // 18 * QK)


QUANTIZE = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0}
DEQUANTIZE = {"q8_0": dequantize_q8_0, "q4_0": dequantize_q4_0}

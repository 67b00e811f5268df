"""Activations rounded to int8 per run of 32, as the CUDA decode GEMV's ``_q8`` kernels round them.

The oracle of those kernels: d = max|x| / 127 and q = roundf(x * (1 / d)) in float32, ggml's
Q8_0 rounding (the q bytes equal ``gguf.quants.quantize(x, Q8_0)``'s; d stays float32 here where a
Q8_0 block stores it as float16). The kernels' dot products are then exact integer sums of
q times the weight's quants, scaled once per run: ``dequantize_act_q8(x) @ W.T`` up to float32
rounding of those scalings and of the accumulation.
"""
from __future__ import annotations

import torch

RUN = 32


def quantize_act_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (K a multiple of 32) -> (q int8 [..., K], d float32 [..., K // 32])."""
    if x.shape[-1] % RUN:
        raise ValueError(f"int8 activations need a multiple of {RUN} features, got {x.shape[-1]}")
    f = x.to(torch.float32).reshape(*x.shape[:-1], -1, RUN)
    d = f.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    p = f * inv
    a = p.abs()
    q = torch.sign(p) * (a.floor() + (2 * (a - a.floor())).floor())  # roundf, exactly: half away from zero
    return q.to(torch.int8).reshape(x.shape), d.squeeze(-1)


def dequantize_act_q8(x: torch.Tensor) -> torch.Tensor:
    """x as the ``_q8`` kernels multiply it: d * q per run, in float64 (exact)."""
    q, d = quantize_act_q8(x)
    return (q.double().reshape(*x.shape[:-1], -1, RUN) * d.double().unsqueeze(-1)).reshape(x.shape)

"""Independent references the specs compare implementations with (float64, no luce kernels)."""
from __future__ import annotations

import math

import numpy as np
import torch

from luce_core.plugin_api import QTensor


def reference_weight(w: QTensor) -> torch.Tensor:
    """``w`` dequantized by gguf (bit-exact with ggml), times its per-tensor scale, as float64."""
    import gguf
    from gguf.quants import dequantize

    qtype = gguf.GGMLQuantizationType[w.qtype]
    values = dequantize(np.ascontiguousarray(w.data), qtype).reshape(w.shape)
    return torch.from_numpy(values.astype(np.float64)) * float(w.scale)


def linear_tolerance(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-output tolerance of ``x @ w.T`` for a float32 result.

    Scaled by the root-sum-square of the products x_j*w_ij: rounding errors (float32, or FP16
    operands inside a kernel) add up like a random walk, while a wrong weight or a dropped
    block moves the result by a whole product, far above this.
    """
    prod_rss = torch.sqrt((x.unsqueeze(-2) ** 2 * (w ** 2)).sum(-1))
    prod_abs = x.abs() @ w.abs().T
    return 5e-3 * prod_rss + 1e-5 * prod_abs + 1e-6


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
              scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v in float64; q [T, H, D], k/v [S, Hkv, D], allowed [T, S]."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    scores = scores.masked_fill(~allowed.bool().unsqueeze(0), -math.inf)
    return torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v)


def causal_mask(start: int, t: int) -> torch.Tensor:
    """bool [t, start+t]: query i (position start+i) may see positions 0..start+i."""
    return torch.arange(start + t)[None, :] <= torch.arange(start, start + t)[:, None]


def tree_mask(start: int, parents: list[int]) -> torch.Tensor:
    """bool [T, start+T] for a draft tree: node i sees the prefix, its ancestors and itself.
    parents[i] < i, or -1 for a node hanging off the prefix."""
    t = len(parents)
    mask = torch.zeros(t, start + t, dtype=torch.bool)
    mask[:, :start] = True
    for i in range(t):
        j = i
        while j >= 0:
            mask[i, start + j] = True
            j = parents[j]
    return mask


# Bytes one stored value takes per dtype, as ggml lays the blocks out (32 values per block).
KV_BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def kv_error_bound(dtype: str, x: torch.Tensor) -> torch.Tensor:
    """Largest admissible |stored - x| per element of ``x`` ([..., head_dim]) for a KV dtype.

    Floats: round to nearest (half an ulp, plus the subnormal step). q8_0: half a step of
    amax/127, plus the fp16 rounding of the scale (127 * 2^-11 steps). q4_0: ggml's scale is
    amax/8 and values near +8 steps clip to +7, so up to one step, plus the fp16 scale rounding.
    """
    x = x.double()
    if dtype == "f32":
        return torch.zeros_like(x)
    if dtype == "f16":
        return x.abs() * 2.0 ** -11 + 2.0 ** -24
    if dtype == "bf16":
        return x.abs() * 2.0 ** -8 + 2.0 ** -133
    if dtype in ("q8_0", "q4_0"):
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        amax = blocks.abs().amax(-1, keepdim=True)
        step = amax / 127 * 0.57 if dtype == "q8_0" else amax / 8 * 1.01
        return (step + 1e-7).expand_as(blocks).reshape(x.shape)
    raise ValueError(f"no error bound for kv dtype {dtype!r}")

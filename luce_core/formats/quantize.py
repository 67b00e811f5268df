"""luce's own quantizers: float tensor -> ggml block bytes (uint8 [rows, row_bytes]).

Q8_0, Q4_0, Q4_1, BF16 and F32 are byte-exact with ``gguf.quants.quantize``, and F16 is too
except for NaN payloads (torch makes NaNs canonical). They use gguf's float32 ops in gguf's
order; divisions by constants go through a device tensor because CUDA turns division by a host
scalar into multiplication by its reciprocal, which rounds differently. gguf has no quantizer
for Q4_K, Q6_K or NVFP4; the k-quant ones here round scales up so that nothing clips, NVFP4's
takes the least-error block scale among the round-up one and a few below it (clipping to +-6
steps), and all round each value to the nearest representable code.
"""
from __future__ import annotations

import numpy as np
import torch

from luce_core.contract.errors import ConfigError
from luce_core.formats.blocks import BLOCKS
from luce_core.formats.dequant import E2M1, UE4M3_TABLE
from luce_core.formats.ggml_math import fp16_bytes, round_half_away

F16_MAX = 65504.0


def _c(x: torch.Tensor, v: float) -> torch.Tensor:
    """A float32 constant on x's device (see module doc: why not a Python scalar)."""
    return torch.tensor(v, dtype=torch.float32, device=x.device)


def _recip0(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (an all-zero block)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))


def _f16_up(v: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 >= v (v >= 0, clamped to the fp16 range), as float32. A scale rounded
    up keeps every value of its block inside the code range."""
    v = v.clamp(max=F16_MAX)
    h = v.to(torch.float16)
    bits = h.view(torch.int16) + (h.to(torch.float32) < v).to(torch.int16)  # next fp16 up
    return bits.view(torch.float16).to(torch.float32)


def _pack_halves(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2, m] -> bytes [..., m]: first half in low nibbles, second in high."""
    return q[..., 0, :] | (q[..., 1, :] << 4)


# ----------------------------------------------------------------------------- legacy 32-blocks
def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = b.abs().amax(dim=1, keepdim=True) / _c(b, 127.0)
    qs = round_half_away(b * _recip0(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([fp16_bytes(d), qs], dim=1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    imax = b.abs().argmax(dim=1, keepdim=True)  # first of equal magnitudes, as numpy
    d = torch.gather(b, 1, imax) / _c(b, -8.0)
    q = torch.trunc(b * _recip0(d) + _c(b, 8.5)).clamp(0, 15).to(torch.uint8)
    return torch.cat([fp16_bytes(d), _pack_halves(q.reshape(n, 2, 16))], dim=1)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    mx = b.amax(dim=1, keepdim=True)
    mn = b.amin(dim=1, keepdim=True)
    d = (mx - mn) / _c(b, 15.0)
    q = torch.trunc((b - mn) * _recip0(d) + _c(b, 0.5)).clamp(0, 15).to(torch.uint8)
    return torch.cat([fp16_bytes(d), fp16_bytes(mn), _pack_halves(q.reshape(n, 2, 16))], dim=1)


# ----------------------------------------------------------------------------- k-quants
def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """x = d*sc[s]*q - dmin*mn[s] over 8 sub-blocks of 32, sc/mn 6-bit, q 4-bit."""
    n = b.shape[0]
    x = b.reshape(n, 8, 32)
    neg_min = (-x.amin(dim=2)).clamp(min=0)  # the offset only ever lowers: min(x, 0)
    dmin = _f16_up(neg_min.amax(dim=1, keepdim=True) / 63)
    mn = torch.ceil(neg_min * _recip0(dmin)).clamp(0, 63)
    offset = dmin * mn  # >= -min, so x + offset >= 0
    need = (x.amax(dim=2) + offset).clamp(min=0) / 15  # step that spans [−offset, max]
    d = _f16_up(need.amax(dim=1, keepdim=True) / 63)
    sc = torch.ceil(need * _recip0(d)).clamp(0, 63)
    step = (d * sc).unsqueeze(2)
    q = torch.round((x + offset.unsqueeze(2)) * _recip0(step)).clamp(0, 15).to(torch.uint8)

    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    lo_sc, hi_sc, lo_mn, hi_mn = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    scales = torch.cat([lo_sc | ((hi_sc >> 4) << 6),
                        lo_mn | ((hi_mn >> 4) << 6),
                        (hi_sc & 15) | ((hi_mn & 15) << 4)], dim=1)
    # 4 chunks of 32 bytes: chunk c holds sub-block 2c (low nibbles) and 2c+1 (high nibbles)
    qs = _pack_halves(q.reshape(n, 4, 2, 32)).reshape(n, 128)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), scales, qs], dim=1)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """x = d*sc[g]*q over 16 groups of 16, sc int8 (>= 0 here), q in [-32, 31]."""
    n = b.shape[0]
    x = b.reshape(n, 16, 16)
    # the smallest step that holds the group in [-32, 31] steps (q's range is not symmetric)
    s = torch.maximum(x.amax(dim=2) / 31, -x.amin(dim=2) / 32).clamp(min=0)
    d = _f16_up(s.amax(dim=1, keepdim=True) / 127)
    sc = torch.ceil(s * _recip0(d)).clamp(0, 127)  # rounded up: nothing clips
    step = (d * sc).unsqueeze(2)
    u = (torch.round(x * _recip0(step)).clamp(-32, 31) + 32).to(torch.uint8).reshape(n, 256)

    # element h*128 + k*64 + j: low nibble in nibble k of ql[h*64 + j]
    ql = _pack_halves((u & 15).reshape(n, 2, 2, 64)).reshape(n, 128)
    # element h*128 + k*32 + j: high 2 bits in bits 2k of qh[h*32 + j]
    hi = (u >> 4).reshape(n, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), fp16_bytes(d)], dim=1)


# ----------------------------------------------------------------------------- NVFP4
_E2M1_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(E2M1[:-1], E2M1[1:]))


# lower UE4M3 codes tried below the round-up one: each is 1/15..1/8 smaller, and a scale is only
# taken while it clips by at most one step (the block max within 7 steps), so no value errs by
# more than E2M1's widest gap allows (4..6: one step). On SmolLM2's weights that bound costs
# nothing measurable (relative RMS error 0.0856 with it, 0.0855 without; 0.099 rounding up).
NVFP4_LOWER_CODES = 3


def _nvfp4_sq_err(ax: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Each block's squared error [n, 4] when |x| [n, 4, 16] is rounded to the nearest E2M1
    multiple of its block's step [n, 4, 1] (beyond 6 steps: clipped to 6)."""
    a = ax * _recip0(step)
    # E2M1's grid is 0.5 below 2, 1 below 4, then 2 (4, 6): round on it (a tie either way has
    # the same error), cheaper than bucketize and a lookup. Grid 2^(e - 128), e = a's biased
    # exponent held to [127, 129]; its reciprocal's exponent field is 255 - e.
    e = (a.view(torch.int32) >> 23).clamp_(127, 129)
    g, rg = ((e - 1) << 23).view(torch.float32), ((255 - e) << 23).view(torch.float32)
    return torch.round(a.mul_(rg)).mul_(g).clamp_(max=6.0).mul_(step).sub_(ax).square_().sum(dim=2)


def _nvfp4_blocks(b: torch.Tensor, tensor_scale: float) -> torch.Tensor:
    n = b.shape[0]
    x = b.reshape(n, 4, 16)
    ax = x.abs()
    ue4m3 = UE4M3_TABLE[:0x7F].to(b.device)  # codes 0x00..0x7E, increasing values 0..448
    ts = _c(b, tensor_scale)
    mids = torch.tensor(_E2M1_MIDPOINTS, device=b.device)
    amax = ax.amax(dim=2)
    need = amax / _c(b, 6.0) / ts
    # the smallest scale >= need keeps the block's largest value within E2M1's 6; a few lower
    # scales clip it (by at most one step) but put the grid closer to the rest: keep whichever
    # has the least squared error (a tie keeps the larger scale). Whole-tensor passes, one per
    # candidate, no loop over blocks.
    code = torch.searchsorted(ue4m3, need.contiguous()).clamp(max=0x7E)
    err = _nvfp4_sq_err(ax, (ue4m3[code] * ts).unsqueeze(2))
    up = code
    for k in range(1, NVFP4_LOWER_CODES + 1):
        cand = (up - k).clamp(min=0)
        step_k = ue4m3[cand] * ts
        err_k = _nvfp4_sq_err(ax, step_k.unsqueeze(2))
        better = (err_k < err) & (amax <= 7 * step_k)
        code, err = torch.where(better, cand, code), torch.where(better, err_k, err)
    step = (ue4m3[code] * ts).unsqueeze(2)
    y = x * _recip0(step)
    mag = torch.bucketize(y.abs(), mids).to(torch.uint8)
    sign = ((y < 0) & (mag > 0)).to(torch.uint8) << 3
    v = (mag | sign).reshape(n, 4, 2, 8)  # sub-block bytes: v[j] | v[j + 8] << 4
    qs = _pack_halves(v).reshape(n, 32)
    return torch.cat([code.to(torch.uint8), qs], dim=1)


def quantize_nvfp4(x: torch.Tensor) -> tuple[np.ndarray, float]:
    """NVFP4 with a per-tensor FP32 scale: returns (ggml NVFP4 bytes [rows, row_bytes],
    tensor_scale); a value is E2M1 * UE4M3(block scale) * tensor_scale. tensor_scale =
    amax / (6 * 448) puts the largest block scale at E4M3's top, 448."""
    rows = _rows(x, "NVFP4")
    amax = float(rows.abs().max()) if rows.numel() else 0.0
    if not np.isfinite(amax):
        raise ConfigError("cannot quantize a tensor holding inf or NaN to NVFP4",
                          remedy="check the weights: they should be finite")
    tensor_scale = float(np.float32(amax) / np.float32(6 * 448)) or 1.0
    blocks = _nvfp4_blocks(rows.reshape(-1, 64), tensor_scale)
    return blocks.reshape(rows.shape[0], -1).cpu().numpy(), tensor_scale


# ----------------------------------------------------------------------------- floats
def _bf16(rows: torch.Tensor) -> torch.Tensor:
    """Round to nearest even; NaNs keep their top bits and become quiet (ggml's conversion)."""
    n = rows.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.to(torch.int32).to(torch.int16).view(torch.uint8)  # low 16 bits, two's complement


_BLOCK_QUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k}
QUANTIZABLE = ("F32", "F16", "BF16", *_BLOCK_QUANT, "NVFP4")


def _rows(x: torch.Tensor, qtype: str) -> torch.Tensor:
    if x.dim() == 0:
        raise ConfigError("cannot quantize a 0-d tensor", remedy="pass at least one row")
    elems = BLOCKS[qtype][0]
    if x.shape[-1] % elems:
        raise ConfigError(f"{qtype} quantizes rows of whole {elems}-element blocks; the last dim is {x.shape[-1]}",
                          remedy=f"pad the rows to a multiple of {elems} or choose another type")
    return x.detach().to(torch.float32).reshape(-1, x.shape[-1])


def quantize(x: torch.Tensor, qtype: str) -> np.ndarray:
    """``x`` (rows along its last dim) as ggml ``qtype`` bytes, uint8 [rows, row_bytes]."""
    if qtype == "NVFP4":
        raise ConfigError("NVFP4 needs a per-tensor scale besides its bytes",
                          remedy="use luce_core.formats.quantize.quantize_nvfp4(x) -> (bytes, tensor_scale)")
    if qtype not in BLOCKS:
        raise ConfigError(f"cannot quantize to {qtype}", remedy=f"choose one of {', '.join(QUANTIZABLE)}")
    rows = _rows(x, qtype)
    if qtype == "F32":
        out = rows.contiguous().view(torch.uint8)
    elif qtype == "F16":
        out = fp16_bytes(rows)
    elif qtype == "BF16":
        out = _bf16(rows)
    else:
        out = _BLOCK_QUANT[qtype](rows.reshape(-1, BLOCKS[qtype][0]))
    return out.reshape(rows.shape[0], -1).cpu().numpy()

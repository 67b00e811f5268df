"""Fused CUDA ops for the model graph: RMSNorm, RoPE, SwiGLU, flash attention.

Every op launches on the current torch stream, takes no host sync and allocates only its
output (or nothing, with ``out=``), so a decode step built from them is capturable in a CUDA
graph. Lengths and positions that change per step can come from device tensors (``length``,
``positions``), whose contents a graph replay re-reads. Call :func:`warmup` before capturing.
"""
from __future__ import annotations

import numpy as np
import torch

from luce_core.errors import ConfigError
from luce_cuda import programs
from luce_cuda.launch import get_kernel, launch

ACT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
DT_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
LOG2E = 1.4426950408889634
SPLIT_LEN = 256  # positions per flash-decode split


def _idx(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _act(t: torch.Tensor) -> str:
    try:
        return ACT[t.dtype]
    except KeyError:
        raise ConfigError(f"luce_cuda ops take f16, bf16 or f32 tensors, got {t.dtype}") from None


def _k(prog, name: str, t: torch.Tensor):
    return get_kernel(prog, name, _idx(t))


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ----------------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim; w is promoted to f32 (pass it as f32
    to avoid a conversion per call)."""
    return _norm(x, None, w, eps, out)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """residual += x (in place, in residual's dtype), then return rms_norm(residual)."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ConfigError("add_rms_norm: residual must match x in shape and dtype")
    return _norm(x, residual, w, eps, out)


def _norm(x: torch.Tensor, res: torch.Tensor | None, w: torch.Tensor, eps: float,
          out: torch.Tensor | None) -> torch.Tensor:
    h = x.shape[-1]
    x2 = _rows2d(x)
    r2 = None
    if res is not None:
        r2 = res.view(-1, h)  # must be a view: the kernel writes the sum back into it
    wf = w if w.dtype == torch.float32 and w.is_contiguous() else w.float().contiguous()
    o = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    o2 = o.view(-1, h)
    rows = x2.shape[0]
    if rows == 0:
        return o
    launch(_k(programs.OPS, f"rms_norm_{_act(x)}", x), (rows,), (256 if h >= 1024 else 128,),
           (x2, r2, wf, o2, np.int32(h), np.float32(eps), np.int64(x2.stride(0)),
            np.int64(r2.stride(0) if r2 is not None else 0), np.int64(o2.stride(0))), like=x)
    return o


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(rope_dim: int, base: float, device: torch.device | str,
                  factors: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """base^(-2i/rope_dim) for i < rope_dim/2 in f64 then f32; divided by ``factors`` (llama3
    rope_freqs) and by ``scale`` (linear scaling) when given."""
    inv = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    if factors is not None:
        inv = inv / factors.double().cpu()
    return (inv / scale).float().to(device)


def rope(x: torch.Tensor, inv_freq: torch.Tensor, *, style: str = "normal", positions: torch.Tensor | None = None,
         start: int = 0) -> torch.Tensor:
    """Rotate x [T, n_heads, head_dim] in place (the first 2*len(inv_freq) channels).

    style "normal": adjacent pairs (GGUF llama); "neox": first/second half (qwen). Position of
    row t: ``positions[t]`` (int32 device tensor; capturable) or ``start + t``."""
    if style not in ("normal", "neox"):
        raise ConfigError(f"rope style {style!r} is not normal or neox")
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ConfigError("rope expects x of shape [T, n_heads, head_dim] with contiguous channels")
    t, nh, d = x.shape
    rd = 2 * inv_freq.numel()
    if rd > d:
        raise ConfigError(f"rope_dim {rd} exceeds head_dim {d}")
    if positions is not None and positions.dtype != torch.int32:
        positions = positions.to(torch.int32)
    total = t * nh * (rd // 2)
    if total == 0:
        return x
    inv = inv_freq if inv_freq.dtype == torch.float32 else inv_freq.float()
    launch(_k(programs.OPS, f"rope_{style}_{_act(x)}", x), (min((total + 255) // 256, 65535),), (256,),
           (x, positions, np.int32(start), inv, np.int32(t), np.int32(nh), np.int32(rd),
            np.int64(x.stride(0)), np.int64(x.stride(1))), like=x)
    return x


# ----------------------------------------------------------------------------- SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up. gate and up may be column slices of one fused [.., 2F] tensor."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ConfigError("swiglu: gate and up must have the same shape and dtype")
    f = gate.shape[-1]
    g2, u2 = gate.reshape(-1, f), up.reshape(-1, f)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    o = out if out is not None else torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    o2 = o.view(-1, f)
    total = g2.shape[0] * f
    if total:
        launch(_k(programs.OPS, f"swiglu_{_act(gate)}", gate), (min((total + 255) // 256, 65535),), (256,),
               (g2, u2, o2, np.int32(g2.shape[0]), np.int32(f), np.int64(g2.stride(0)), np.int64(u2.stride(0)),
                np.int64(o2.stride(0))), like=gate)
    return o


# ----------------------------------------------------------------------------- attention
def attention_supported(head_dim: int, kv_dtype: torch.dtype) -> list[str]:
    """Reasons the attention kernels cannot serve this cache (empty: they can)."""
    out = []
    if head_dim not in programs.HEAD_DIMS:
        out.append(f"head_dim {head_dim} not in {programs.HEAD_DIMS}")
    if kv_dtype not in (torch.float16, torch.bfloat16):
        out.append(f"KV cache dtype {kv_dtype} (kernels read f16/bf16)")
    return out


class DecodeWorkspace:
    """Static split buffers for flash_decode, sized once for ``max_len`` positions."""

    def __init__(self, n_heads: int, head_dim: int, max_len: int, device: torch.device | str,
                 split_len: int = SPLIT_LEN):
        self.split_len = split_len
        self.max_splits = max(1, -(-max_len // split_len))
        self.o = torch.empty((self.max_splits, n_heads, head_dim), dtype=torch.float32, device=device)
        self.ml = torch.empty((self.max_splits, n_heads, 2), dtype=torch.float32, device=device)


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int | torch.Tensor, scale: float, *,
                 out: torch.Tensor | None = None, workspace: DecodeWorkspace | None = None,
                 max_len: int | None = None) -> torch.Tensor:
    """One query token: q [1 or none, H, D] over K/V rows [0, length) of k, v [capacity, Hkv, D].

    ``length`` as a 1-element int32 device tensor makes the launch graph-capturable: the grid is
    sized for ``max_len`` (default: capacity) and blocks past the length exit."""
    if q.dim() == 3:
        if q.shape[0] != 1:
            raise ConfigError("flash_decode takes one query token; use flash_prefill for more")
        q2 = q[0]
    else:
        q2 = q
    h, d = q2.shape
    cap, hkv, dk = k.shape
    if dk != d or v.shape != k.shape or v.dtype != k.dtype or h % hkv:
        raise ConfigError(f"flash_decode: q {tuple(q.shape)} does not fit k/v {tuple(k.shape)}")
    if k.stride(2) != 1 or k.stride(1) != d or v.stride() != k.stride():
        raise ConfigError("flash_decode: k/v must be [capacity, n_kv_heads, head_dim] with contiguous rows")
    q2 = q2.contiguous()
    kv = ACT[k.dtype]
    dyn = isinstance(length, torch.Tensor)
    n_max = max_len if max_len is not None else (cap if dyn else int(length))
    ws = workspace or DecodeWorkspace(h, d, n_max, q.device)
    split_len = ws.split_len
    n_splits = -(-n_max // split_len)
    if n_splits > ws.max_splits:
        raise ConfigError(f"decode workspace holds {ws.max_splits} splits, {n_splits} needed")
    length_arg = np.int32(0 if dyn else int(length))
    len_ptr = length if dyn else None
    if dyn and (length.dtype != torch.int32 or not length.is_cuda):
        raise ConfigError("flash_decode: a tensor length must be an int32 CUDA tensor")
    o = out if out is not None else torch.empty((1, h, d), dtype=q.dtype, device=q.device)
    g = h // hkv
    grid = (hkv, max(n_splits, 1), -(-g // 8))
    launch(_k(programs.ATTN_DECODE, f"flash_decode_{kv}_d{d}", q), grid, (128,),
           (q2, np.int32(DT_CODE[q.dtype]), k, v, ws.o, ws.ml, np.int32(h), np.int32(hkv), np.int64(k.stride(0)),
            length_arg, len_ptr, np.int32(split_len), np.float32(scale * LOG2E)), like=q)
    launch(_k(programs.ATTN_DECODE, f"flash_decode_combine_{ACT[q.dtype]}", q), (h,), (min(d, 128),),
           (ws.o, ws.ml, o, np.int32(h), np.int32(d), length_arg, len_ptr, np.int32(split_len)), like=q)
    return o


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [T, H, D] at positions start.. over K/V rows [0, start+T) of
    k, v [capacity, Hkv, D] in f16 or bf16 (FP16 tensor-core operands, FP32 softmax/accumulate)."""
    t, h, d = q.shape
    cap, hkv, dk = k.shape
    if dk != d or v.shape != k.shape or v.dtype != k.dtype or h % hkv or start + t > cap:
        raise ConfigError(f"flash_prefill: q {tuple(q.shape)} at {start} does not fit k/v {tuple(k.shape)}")
    why = attention_supported(d, k.dtype)
    if why:
        raise ConfigError(f"flash_prefill cannot run: {'; '.join(why)}")
    if k.stride(2) != 1 or k.stride(1) != d or v.stride() != k.stride():
        raise ConfigError("flash_prefill: k/v must be [capacity, n_kv_heads, head_dim] with contiguous rows")
    q = q.contiguous()
    o = out if out is not None else torch.empty_like(q)
    launch(_k(programs.ATTN_PREFILL, f"flash_prefill_{ACT[k.dtype]}_d{d}", q), (-(-t // 64), h), (128,),
           (q, o, np.int32(DT_CODE[q.dtype]), k, v, np.int32(t), np.int32(start), np.int32(h), np.int32(hkv),
            np.int64(k.stride(0)), np.float32(scale * LOG2E)), like=q)
    return o


def warmup(device: torch.device | str | int = 0, dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16),
           head_dims: tuple[int, ...] = programs.HEAD_DIMS) -> None:
    """Load the op kernels for these dtypes before any CUDA-graph capture."""
    idx = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index or 0
    for dt in dtypes:
        a = ACT[dt]
        for name in (f"rms_norm_{a}", f"rope_normal_{a}", f"rope_neox_{a}", f"swiglu_{a}"):
            get_kernel(programs.OPS, name, idx)
        get_kernel(programs.ATTN_DECODE, f"flash_decode_combine_{a}", idx)
        if dt in (torch.float16, torch.bfloat16):
            for d in head_dims:
                get_kernel(programs.ATTN_DECODE, f"flash_decode_{a}_d{d}", idx)
                get_kernel(programs.ATTN_PREFILL, f"flash_prefill_{a}_d{d}", idx)


__all__ = ["rms_norm", "add_rms_norm", "rope", "rope_inv_freq", "swiglu", "flash_decode", "flash_prefill",
           "DecodeWorkspace", "attention_supported", "warmup"]

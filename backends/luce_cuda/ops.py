"""Fused CUDA ops for the model graph: RMSNorm, RoPE, SwiGLU, flash attention.

Every op launches on the current torch stream, takes no host sync and allocates only its
output (or nothing, with ``out=``), so a decode step built from them is capturable in a CUDA
graph. Lengths and positions that change per step can come from device tensors (``length``,
``positions``), whose contents a graph replay re-reads. Call :func:`warmup` before capturing.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from luce_core.plugin_api import ConfigError
from luce_core.formats.blocks import QUANTIZED, vector_bytes
from luce_core.formats.dtypes import DTYPE_NAMES
from luce_cuda import programs
from luce_cuda.launch import device_index, get_kernel, launch

ACT = DTYPE_NAMES
DT_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
LOG2E = 1.4426950408889634
RMS_VPT = 16  # values per thread in rms_norm (luce_common.cuh RMS_VPT)
SPLIT_LEN = 128  # positions per flash-decode split: one 32-position tile per warp of a block


def _act(t: torch.Tensor) -> str:
    try:
        return ACT[t.dtype]
    except KeyError:
        raise ConfigError(f"luce_cuda ops take f16, bf16 or f32 tensors, got {t.dtype}") from None


def _k(prog, name: str, t: torch.Tensor):
    return get_kernel(prog, name, device_index(t))


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ----------------------------------------------------------------------------- RMSNorm
def rms_threads(h: int) -> int:
    """Threads of the rms_norm kernel for rows of h; its summation order depends on it, and the
    GEMV's fused RMSNorm reproduces that order from this number."""
    threads = 128 if h <= 128 * RMS_VPT else 256 if h <= 256 * RMS_VPT else 1024
    if h > threads * RMS_VPT:
        raise ConfigError(f"rms_norm: rows of {h} exceed the kernel's {1024 * RMS_VPT}",
                          remedy="no luce model has a hidden size this large; use the torch backend")
    return threads


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
    threads = rms_threads(h)
    launch(_k(programs.OPS, f"rms_norm_{_act(x)}", x), (rows,), (threads,),
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


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, style: str = "normal",
            positions: torch.Tensor | None = None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place, in one launch, from f32 tables cos/sin
    [max_positions, rope_dim/2] (row p = position p). Row t's position: ``positions[t]`` (int64
    device tensor, capturable) or ``start + t``. q and k may be column views of one QKV output."""
    if style not in ("normal", "neox"):
        raise ConfigError(f"rope style {style!r} is not normal or neox")
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 3 or x.stride(-1) != 1:
            raise ConfigError(f"rope_qk: {name} must be [T, heads, head_dim] with contiguous channels")
    if q.dtype != k.dtype or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ConfigError("rope_qk: q and k must share dtype, T and head_dim")
    half = cos.shape[-1]
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ConfigError("rope_qk: cos/sin must be contiguous float32 tables")
    if 2 * half > q.shape[2]:
        raise ConfigError(f"rope_dim {2 * half} exceeds head_dim {q.shape[2]}")
    if positions is not None and positions.dtype != torch.int64:
        positions = positions.to(torch.int64)
    t, hq, _ = q.shape
    hk = k.shape[1]
    total = t * (hq + hk) * half
    if total == 0:
        return q, k
    launch(_k(programs.OPS, f"rope_qk_{style}_{_act(q)}", q), (min((total + 255) // 256, 65535),), (256,),
           (q, k, positions, np.int32(start), cos, sin, np.int32(t), np.int32(hq), np.int32(hk), np.int32(half),
            np.int64(q.stride(0)), np.int64(q.stride(1)), np.int64(k.stride(0)), np.int64(k.stride(1))), like=q)
    return q, k


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
# Cache formats the decode kernel reads (K and V independently), with the kernels' F_* codes.
KV_FORMATS: dict[str, int] = {f: i for i, f in enumerate(programs.KV_FORMATS)}  # F_F16 .. F_Q4_0


def kv_format(t: torch.Tensor, head_dim: int, fmt: str | None = None) -> str:
    """The format of a cache tensor [capacity, n_kv_heads, row]: its float dtype's name, or ``fmt``
    (q8_0 / q4_0) for uint8 ggml blocks, which must be named since both are uint8."""
    if t.dtype == torch.uint8:
        if fmt not in QUANTIZED:
            raise ConfigError(f"a uint8 KV cache holds q8_0 or q4_0 blocks; name its format (got {fmt!r})")
        row = vector_bytes(head_dim, fmt)
        if t.shape[-1] != row:
            raise ConfigError(f"{fmt} cache rows of head_dim {head_dim} are {row} bytes, got {t.shape[-1]}")
        return fmt
    name = DTYPE_NAMES.get(t.dtype)
    if name is None or (fmt is not None and fmt != name):
        raise ConfigError(f"KV cache of dtype {t.dtype} does not hold format {fmt or 'f16/bf16/f32'}")
    if t.shape[-1] != head_dim:
        raise ConfigError(f"KV cache rows have {t.shape[-1]} elements, head_dim is {head_dim}")
    return name


def attention_supported(head_dim: int, k_fmt: str | torch.dtype, v_fmt: str | torch.dtype | None = None) -> list[str]:
    """Reasons the attention kernels cannot serve this cache (empty: they can). Formats are names
    (f16, bf16, f32, q8_0, q4_0) or float dtypes; V defaults to K's."""
    out = []
    if head_dim not in programs.HEAD_DIMS:
        out.append(f"head_dim {head_dim} not in {programs.HEAD_DIMS}")
    for side, f in (("K", k_fmt), ("V", k_fmt if v_fmt is None else v_fmt)):
        name = DTYPE_NAMES.get(f, str(f)) if isinstance(f, torch.dtype) else f
        if name not in KV_FORMATS:
            out.append(f"{side} cache format {name} (kernels read {', '.join(KV_FORMATS)})")
    return out


class DecodeWorkspace:
    """Static split buffers for flash_decode, sized once for ``max_len`` positions and up to
    ``n_tokens`` query tokens per call (layout [split][token][head])."""

    def __init__(self, n_heads: int, head_dim: int, max_len: int, device: torch.device | str,
                 split_len: int = SPLIT_LEN, n_tokens: int = 1):
        self.split_len = split_len
        self.n_tokens = n_tokens
        self.max_splits = max(1, -(-max_len // split_len))
        self.o = torch.empty((self.max_splits, n_tokens, n_heads, head_dim), dtype=torch.float32, device=device)
        self.ml = torch.empty((self.max_splits, n_tokens, n_heads, 2), dtype=torch.float32, device=device)
        # per (KV head, row group) count of finished split blocks; the last one merges and re-arms it
        self.done = torch.zeros(n_heads * n_tokens, dtype=torch.int32, device=device)


def _check_cache(name: str, x: torch.Tensor, fmt: str) -> None:
    if x.stride(-1) != 1 or x.stride(1) != x.shape[-1]:
        raise ConfigError(f"flash_decode: {name} must be [capacity, n_kv_heads, row] with contiguous rows")
    align = 4 if fmt in QUANTIZED else 16  # u32 block words; 16-byte float vectors
    row_stride = x.stride(0) * x.element_size()
    if x.data_ptr() % align or row_stride % align or row_stride >= 2**31:
        raise ConfigError(f"flash_decode: {name} rows must be {align}-byte aligned, under 2 GiB apart")


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int | torch.Tensor, scale: float, *,
                 out: torch.Tensor | None = None, workspace: DecodeWorkspace | None = None,
                 max_len: int | None = None, positions: torch.Tensor | None = None, k_fmt: str | None = None,
                 v_fmt: str | None = None, signs: torch.Tensor | None = None, rot_group: int = 0,
                 tail: torch.Tensor | None = None, tail_start: torch.Tensor | None = None) -> torch.Tensor:
    """Query tokens q [T, H, D] (or [H, D] for one) over K/V rows of k, v [capacity, Hkv, row], each
    in any cache format: f16, bf16, f32 tensors, or uint8 ggml blocks named by ``k_fmt``/``v_fmt``
    (q8_0, q4_0). Returns [T, H, D] in q's dtype (or writes ``out``).

    Token t sees rows [0, positions[t]] when ``positions`` (int64 CUDA tensor [T]) is given, else
    [0, length + t) with ``length`` an int or a 1-element int32 CUDA tensor. The device forms make
    the launch graph-capturable: the grid is sized for ``max_len`` rows (default: capacity), rows
    at or past max_len are never read, and blocks past a token's length exit at once.

    ``signs`` (f32 [D]) and ``rot_group`` move q into a Hadamard-rotated K's basis in the kernel:
    q * signs, then a normalized Walsh-Hadamard transform over aligned groups of rot_group.

    ``tail`` (int32 CUDA [T, W], with ``positions`` and ``tail_start``, an int32 CUDA [1]; tree
    verification, see ``luce_core.speculative.tree.TreeMask``) remaps token t's positions p >= s =
    tail_start[0] to the rows ``tail[t, p - s]``: the token attends to its own sequence of rows,
    rounded exactly as a one-token decode over that sequence laid out in order. Entries past
    positions[t] - s are never read; W must exceed every positions[t] - s."""
    q3 = q[None] if q.dim() == 2 else q
    if q3.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape[:2] != v.shape[:2] or q3.shape[1] % k.shape[1]:
        raise ConfigError(f"flash_decode: q {tuple(q.shape)} does not fit k {tuple(k.shape)}, v {tuple(v.shape)}")
    t, h, d = q3.shape
    cap, hkv = k.shape[0], k.shape[1]
    _act(q)  # f16, bf16 or f32 queries (and output)
    kf, vf = kv_format(k, d, k_fmt), kv_format(v, d, v_fmt)
    why = attention_supported(d, kf, vf)
    if why:
        raise ConfigError(f"flash_decode cannot run: {'; '.join(why)}")
    _check_cache("k", k, kf)
    _check_cache("v", v, vf)
    if q3.stride(-1) != 1 or q3.stride(1) != d:
        q3 = q3.contiguous()
    dyn = isinstance(length, torch.Tensor)
    if dyn and (length.dtype != torch.int32 or not length.is_cuda):
        raise ConfigError("flash_decode: a tensor length must be an int32 CUDA tensor")
    if positions is not None:
        if positions.dtype != torch.int64:
            positions = positions.to(torch.int64)
        if not positions.is_cuda or positions.shape != (t,) or not positions.is_contiguous():
            raise ConfigError(f"flash_decode: positions must be a contiguous int64 CUDA tensor [{t}]")
    if tail is not None:
        if positions is None or tail_start is None:
            raise ConfigError("flash_decode: a tail table needs positions and tail_start")
        if (tail.dtype != torch.int32 or not tail.is_cuda or tail.dim() != 2 or tail.shape[0] != t
                or not tail.is_contiguous()):
            raise ConfigError(f"flash_decode: tail must be a contiguous int32 CUDA tensor [{t}, W]")
        if tail_start.dtype != torch.int32 or not tail_start.is_cuda or tail_start.numel() != 1:
            raise ConfigError("flash_decode: tail_start must be an int32 CUDA tensor [1]")
    if max_len is not None:
        n_max = int(max_len)
    elif dyn or positions is not None:
        n_max = cap
    else:
        n_max = int(length) + t - 1
    if n_max > cap:
        raise ConfigError(f"flash_decode: {n_max} rows asked for, the cache holds {cap}")
    if rot_group > 1 and (rot_group & (rot_group - 1) or d % rot_group):
        raise ConfigError(f"flash_decode: rotation group {rot_group} is not a power of two dividing {d}")
    if signs is not None and (signs.dtype != torch.float32 or signs.shape != (d,) or not signs.is_cuda):
        raise ConfigError(f"flash_decode: signs must be a float32 CUDA tensor [{d}]")
    ws = workspace or DecodeWorkspace(h, d, n_max, q.device, n_tokens=t)
    split_len = ws.split_len
    n_splits = max(1, -(-n_max // split_len))
    if n_splits > ws.max_splits or t > ws.n_tokens or ws.o.shape[2:] != (h, d):
        raise ConfigError(f"decode workspace holds {ws.max_splits} splits x {ws.n_tokens} tokens of "
                          f"{tuple(ws.o.shape[2:])}; {n_splits} x {t} of {(h, d)} needed")
    o = out if out is not None else torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if o.numel() != t * h * d or o.dtype != q.dtype or not o.is_contiguous():
        raise ConfigError(f"flash_decode: out must be a contiguous [{t}, {h}, {d}] tensor")
    length_arg = np.int32(0 if dyn else int(length))
    len_ptr = length if dyn else None
    sl = np.float32(scale * LOG2E / (math.sqrt(rot_group) if rot_group > 1 else 1.0))
    g = h // hkv
    if tail is None:
        ng = 4 if t * g <= 4 else 8  # query rows per block (kernel suffix _g4: a decode step, GQA group <= 4)
        grid = (hkv, n_splits, -(-(t * g) // ng))
    else:  # a block per token (and per 8 of its rows): the token's rows share one row map
        ng = 4 if g <= 4 else 8
        grid = (hkv, n_splits, t * -(-g // ng))
    prog = (programs.ATTN_DECODE if tail is None else programs.ATTN_DECODE_TREE)[kf]
    name = f"flash_decode_{kf}_d{d}{'_g4' if ng == 4 else ''}{'' if tail is None else '_tree'}"
    launch(_k(prog, name, q), grid, (128,),
           (q3, np.int32(DT_CODE[q.dtype]), np.int64(q3.stride(0)), k, v, np.int32(KV_FORMATS[vf]), ws.o, ws.ml,
            ws.done, o, np.int32(h), np.int32(hkv), np.int32(t), np.int32(k.stride(0) * k.element_size()),
            np.int32(v.stride(0) * v.element_size()), length_arg, len_ptr, positions, np.int32(n_max),
            np.int32(split_len), sl, signs, np.int32(rot_group), tail, tail_start,
            np.int32(0 if tail is None else tail.shape[1])), like=q)
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
    if k.dtype not in (torch.float16, torch.bfloat16):
        why.append(f"the prefill kernel reads f16/bf16 caches, not {k.dtype} (convert or dequantize first)")
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
           head_dims: tuple[int, ...] = programs.HEAD_DIMS, kv_formats: tuple[str, ...] = ("f16", "bf16")) -> None:
    """Load the op kernels for these activation dtypes, head dims and K cache formats (one decode
    program per K format, any V format) before any CUDA-graph capture."""
    idx = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index or 0
    for dt in dtypes:
        a = ACT[dt]
        for name in (f"rms_norm_{a}", f"rope_normal_{a}", f"rope_neox_{a}", f"swiglu_{a}"):
            get_kernel(programs.OPS, name, idx)
        if dt in (torch.float16, torch.bfloat16):
            for d in head_dims:
                get_kernel(programs.ATTN_PREFILL, f"flash_prefill_{a}_d{d}", idx)
    for f in kv_formats:
        for d in head_dims:
            for g in ("", "_g4"):
                get_kernel(programs.ATTN_DECODE[f], f"flash_decode_{f}_d{d}{g}", idx)


__all__ = ["rms_norm", "add_rms_norm", "rope", "rope_qk", "rope_inv_freq", "swiglu", "flash_decode", "flash_prefill",
           "DecodeWorkspace", "attention_supported", "kv_format", "KV_FORMATS", "warmup"]

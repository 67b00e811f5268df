"""The ``linear`` role on CUDA: GEMV/GEMM kernels that read quantized weights directly.

* decode (one row of x): a GEMV that reads every weight byte once (kernels/gemv.cu);
* prefill (several rows): a tensor-core GEMM that dequantizes W tiles into shared memory
  (kernels/gemm.cu): BF16 WMMA on SM 8.0+ (impl "cuda"), FP16 WMMA on SM 7.5+ (impl "cuda-sm75");
* F32/F16/BF16 weights are stored in the compute dtype and multiplied by torch (cuBLAS).

Precision: the GEMV accumulates in FP32 from the exact block values. For large Q4_0, Q4_1 and Q8_0
weights (``int8_pays``) with f16/bf16 activations it first rounds x to int8 per 32 (ggml's Q8_0
rounding, as llama.cpp's quantized matmuls do; ``LUCE_GEMV_Q8=0`` keeps x in float) and sums in
integers: four times fewer instructions, which these latency-bound kernels need (bench/results).
The GEMM rounds x and the decoded W tile to the MMA type (BF16, or FP16 on the SM 7.5 path; f16
inputs always use FP16), so f32 inputs lose precision there. Up to ``GEMV_MAX_ROWS`` rows (decode,
speculative verify) run through the GEMV instead, which reads each weight unit once per chunk of
up to 8 rows and gives every row the exact rounding of a one-row decode step. Weights of several
projections with the same input (QKV, gate+up) can be concatenated row-wise into one QTensor
before ``prepare`` to save launches.

Kernel launches take no host sync and allocate nothing but their outputs, so a decode step is
capturable in a CUDA graph once :meth:`QuantLinear.warmup` (or one call) has loaded the kernels.
"""
from __future__ import annotations

import os
from typing import Callable

import attrs
import numpy as np
import torch

from luce_core.plugin_api import Caps, ConfigError, QTensor, RunConfig, rows_exact
from luce_cuda import ops, programs
from luce_core.formats.dtypes import DTYPE_NAMES
from luce_cuda.launch import device_index, get_kernel, launch
from luce_cuda.weights import QUANTIZED, DeviceWeight, upload

ACT = DTYPE_NAMES
DENSE = {"F32", "F16", "BF16"}
GEMV_WARPS = 8  # warps per GEMV block
GEMV_ROWS = 2  # rows per warp (LUCE_GEMV_ROWS in kernels/gemv.cu)
GEMV_CHUNK = 8  # x rows per GEMV launch (kernel gemv_<q>_<act>_x8; one row: gemv_<q>_<act>)
GEMV_MAX_ROWS = 32  # up to this many rows (decode, speculative verify) use the GEMV, more the GEMM
GEMV_SMEM = 48 * 1024  # the fused RMSNorm's or the int8 activations' rows: at most the default budget
# Int8 activations for weights of at least this many elements and at least as many rows as
# columns: elsewhere quantizing x before the first weight load costs more than the integer dot
# saves (H200, one x row, float against int8: the 1.2B's Q4_0 gate|up 16384x2048 14.8 against
# 10.1 us, QKV 3072x2048 6.7 against 4.9, but its down 2048x8192 7.5 against 8.1 and SmolLM2's
# 576x576 Q4_1 1.9 against 2.5; bench/results).
GEMV_Q8_MIN_WEIGHTS = 1 << 22
# A few rows (a speculative verify) of a weight this small run side by side, one grid row of
# blocks per 1, 4 or 8 x rows (the one-row kernel, or the x8 kernel; grid y), each block's weight
# reads hitting L2 after the first, instead of x8 launches one after another, whose lanes do
# every row's dot products in turn. The fewest rows per block whose grid stays within
# GEMV_ROWPAR_MAX_BLOCKS (each block repeats the x quantization; beyond that, blocks wait for
# others' SMs; a limit of 400 made SmolLM2's 8-row verify step 1 265 us instead of 1 185). H200,
# Q4_1, bf16, 8 rows, us per launch (norm: the rms_norm kernel first), x8 launches against 1 | 4
# rows per block: SmolLM2's QKV 960x576 norm 7.7 against 7.1 | 6.1, O
# 576x576 6.9 against 4.1 | 4.6, gate|up 3072x576 13.3 against 16.6 | 13.4 (192 blocks a row);
# 2048x2048 9.7 against 10.3 | 7.7. The x8 kernel with 2 rows a block lost to both
# (bench/results/gemv_rows_per_block_h200_s18.txt). LUCE_GEMV_ROWPAR=0 forces x8 launches, 1 / 4 /
# 8 that many rows per block (formats in programs.GEMV_ROWPAR only).
GEMV_ROWPAR_MAX_BYTES = 4 << 20
GEMV_ROWPAR_MAX_BLOCKS = 512


@attrs.frozen
class RopeStore:
    """What a QKV GEMV needs to rotate q and k and store k and v itself (kernels/gemv.cu
    RopeStore): the x rows' RoPE positions (int64 device [m]) and cache slots (int64 device [m],
    or ``start`` + row), the f32 tables cos/sin [max_pos, half] (RoPE on channel pairs (2i, 2i + 1)
    for i < half), one layer's K and V caches (f32/f16/bf16 [capacity, nk / d, d]; formats as
    kv_append.cu's codes) and the Q, K widths and head dim of the [Q; K; V] weight."""

    positions: torch.Tensor
    slots: torch.Tensor | None
    start: int
    cos: torch.Tensor
    sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_fmt: int
    v_fmt: int
    capacity: int
    nq: int
    nk: int
    head_dim: int

    def args(self, row: int) -> tuple:
        """The kernel's rs_* arguments for x rows from ``row`` on."""
        return (self.positions[row:], None if self.slots is None else self.slots[row:], np.int64(self.start + row),
                self.cos, self.sin, self.k_cache, self.v_cache, np.int64(self.capacity), np.int32(self.nq),
                np.int32(self.nk), np.int32(self.head_dim), np.int32(self.cos.shape[-1]), np.int32(self.k_fmt),
                np.int32(self.v_fmt))


NO_ROPE_STORE = (None, None, np.int64(0), None, None, None, None, np.int64(0), *(np.int32(0),) * 6)


def int8_pays(n: int, k: int) -> bool:
    """Whether an n x k GEMV gains from int8 activations (see GEMV_Q8_MIN_WEIGHTS)."""
    return n >= k and n * k >= GEMV_Q8_MIN_WEIGHTS


def _dense(w: QTensor) -> torch.Tensor:
    raw = np.ascontiguousarray(w.data).reshape(-1)
    if w.qtype == "F32":
        t = torch.from_numpy(raw.view(np.float32).copy())
    elif w.qtype == "F16":
        t = torch.from_numpy(raw.view(np.float16).copy())
    else:  # BF16: the high half of an f32
        t = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    return t.reshape(w.shape)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as a [M, K] matrix whose rows start 16-byte aligned (kernels use 16-byte loads)."""
    if x.shape[-1] != k:
        raise ConfigError(f"linear input has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    return x2


class QuantLinear:
    """``y = x @ W.T`` for one quantized weight on one device; call it like a function."""

    def __init__(self, w: DeviceWeight, mma: str):
        self.w = w
        self.mma = mma  # "bf16": BF16 tensor cores allowed; "f16": FP16 only (SM 7.5 path)
        q = programs.QTYPES[w.qtype]
        self._q = q
        self._gemv = programs.GEMV[q]
        self._gemm = {"f16": programs.GEMM_F16[q], "bf16": programs.GEMM_BF16[q]}
        # warps per GEMV row group: about 2 units (64 weights) per lane, 1..8 warps
        units = w.k // 32
        # int8 activations: K bytes + 8 per 32 (scale and sum) per x row in shared memory
        self._q8_row = w.k + 8 * units if (q in programs.GEMV_Q8 and w.k + 8 * units <= GEMV_SMEM
                                           and int8_pays(w.n, w.k)) else 0
        self._wpr = 1
        while self._wpr < GEMV_WARPS and units >= 64 * self._wpr * 2:
            self._wpr *= 2

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.n, self.w.k

    def warmup(self, dtype: torch.dtype) -> None:
        """Load every kernel this weight launches for activations of ``dtype`` (before graph capture)."""
        idx = device_index(next(p for p in self.w.planes if p is not None))
        q8 = "_q8" if self.int8_activations(dtype) else ""
        for suffix in ("", "_x8", "_norm"):
            get_kernel(self._gemv, f"gemv_{self._q}_{ACT[dtype]}{suffix}{q8}", idx)
        mt = self._gemm_type(dtype)
        get_kernel(self._gemm[mt], f"gemm_{self._q}_{mt}", idx)

    def rows_per_block(self, m: int, chunk: int = GEMV_CHUNK, glu: bool = False) -> int:
        """How a verify's m > 1 rows share a launch: each grid row of blocks takes this many x
        rows (1: the one-row kernel; more: the x8 kernel), or 0 for launches of ``chunk`` rows
        one after another. Either way each row rounds exactly as decode. See
        GEMV_ROWPAR_MAX_BYTES; ``LUCE_GEMV_ROWPAR`` = 0 forces chunks, N that many rows a block."""
        if m <= 1 or self._q not in programs.GEMV_ROWPAR:
            return 0
        env = os.environ.get("LUCE_GEMV_ROWPAR", "auto")
        if env.isdigit():
            return min(int(env), chunk, m)
        if self.w.nbytes > GEMV_ROWPAR_MAX_BYTES:
            return 0
        per_row = self._row_blocks(glu)
        return next((mb for mb in (1, 4, 8) if mb <= min(chunk, m) and -(-m // mb) * per_row <= GEMV_ROWPAR_MAX_BLOCKS),
                    0)

    def _row_blocks(self, glu: bool) -> int:
        """Blocks of a one-row GEMV without the persistent grid's cap: outputs / per block."""
        per_block = GEMV_WARPS // self._wpr * (1 if glu else GEMV_ROWS)
        outs = self.w.n // 2 if glu else self.w.n
        return -(-outs // per_block)

    def int8_activations(self, dtype: torch.dtype) -> bool:
        """Whether the GEMV quantizes x to int8 (the same for every row count: verify == decode)."""
        return bool(self._q8_row) and dtype != torch.float32 and os.environ.get("LUCE_GEMV_Q8", "1") != "0"

    def _gemm_type(self, dtype: torch.dtype) -> str:
        if self.mma == "f16":
            return "f16"
        return "f16" if dtype == torch.float16 else "bf16"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def fuses_rope_store(self, m: int) -> bool:
        """Whether ``forward(x, rope=...)`` of m rows takes the GEMV, whose epilogue does it."""
        return 0 < m <= GEMV_MAX_ROWS

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False, *,
                glu: bool = False, norm: tuple[torch.Tensor, float] | None = None, out_f32: bool = False,
                rope: RopeStore | None = None) -> torch.Tensor:
        """y = x @ W.T; into ``out`` when given. ``accumulate`` (residual fusion): out + y, rounded
        as ``out + forward(x)`` rounds, bit for bit.

        ``glu``: W is [gate; up] and y = silu(x @ gate.T) * (x @ up.T), half W's rows wide; the
        GEMV computes it in its epilogue (no SwiGLU launch), the GEMM path runs the op after.
        ``norm`` = (w, eps): x is first RMS-normalized as ``ops.rms_norm(x, w, eps)`` (w f32): for
        one row (decode) by the GEMV itself (bit for bit the same) when the row fits in shared
        memory, else by that op. Fused was faster on all four decode shapes measured (graph
        replays on an H200, bench/results: 1.2B QKV 6.5 against 7.7 us for norm + GEMV, its
        gate|up 15.1 against 15.6); for several rows the op first was (see kernels/gemv.cu).
        ``out_f32``: y in f32 (each value rounded to x's dtype first: ``forward(x).float()``, one
        launch). ``rope`` (W is [Q; K; V], rows as in :class:`RopeStore`, only where
        :meth:`fuses_rope_store`): q rotated in y, k rotated and v stored in the caches, k and v
        left unrotated in y; bit for bit this GEMV then the KV store's ``write_rotary``."""
        n, k = self.w.n, self.w.k
        if glu:
            if n % 2 or (out is not None and accumulate):
                raise ConfigError("glu needs an even number of weight rows (gate then up) and no accumulate")
            n //= 2
        if (out_f32 or rope is not None) and (glu or out is not None):
            raise ConfigError("out_f32 and rope take neither glu nor out")
        out_f32 = out_f32 and x.dtype != torch.float32
        lead = x.shape[:-1]
        x2 = _rows(x, k)
        m = x2.shape[0]
        if rope is not None and (n != rope.nq + 2 * rope.nk or not self.fuses_rope_store(m)):
            raise ConfigError(f"a RoPE-and-store GEMV needs a [Q; K; V] weight of {rope.nq} + 2 x {rope.nk} rows "
                              f"(this one has {n}) and at most {GEMV_MAX_ROWS} x rows")
        if out is not None and (out.dtype != x.dtype or out.shape != (*lead, n) or not out.is_contiguous()):
            raise ConfigError(f"out must be a contiguous {x.dtype} tensor of shape {(*lead, n)}")
        if m == 0:
            return out if out is not None else x.new_empty((*lead, n))
        q8 = self.int8_activations(x2.dtype)
        # x rows per GEMV launch: up to 8, fewer when the int8 rows would overflow shared memory
        chunk = max(1, min(GEMV_CHUNK, GEMV_SMEM // self._q8_row)) if q8 else GEMV_CHUNK
        if norm is not None and (m > 1 or (not q8 and k * x2.element_size() > GEMV_SMEM)):
            x2, norm = ops.rms_norm(x2, norm[0], norm[1]), None
        if m <= GEMV_MAX_ROWS:
            # decode and speculative verify: the GEMV, row by row side by side or in chunks of up
            # to 8 x rows, so every row rounds exactly as a one-row decode step (lossless verify)
            y = out.view(m, n) if out is not None else \
                torch.empty((m, n), dtype=torch.float32 if out_f32 else x2.dtype, device=x2.device)
            add = accumulate and out is not None
            mb = self.rows_per_block(m, chunk, glu)
            if mb:  # grid rows side by side, then the rows that do not fill a grid row
                full = m - m % mb
                self._gemv_call(x2[:full], y[:full], add, glu, norm, q8, per_block=mb, rope=rope)
                if full < m:
                    self._gemv_call(x2[full:], y[full:], add, glu, norm, q8, rope=rope, row=full)
            else:
                for i in range(0, m, chunk):
                    self._gemv_call(x2[i:i + chunk], y[i:i + chunk], add, glu, norm, q8, rope=rope, row=i)
        elif out_f32:
            y = self._gemm_call(x2, None, False).float()
        elif glu:
            gu = self._gemm_call(x2, None, False)
            y = ops.swiglu(gu[:, :n], gu[:, n:], out=None if out is None else out.view(m, n))
        else:
            y = self._gemm_call(x2, out, accumulate)
        return y.reshape(*lead, n)

    def _gemv_call(self, x2: torch.Tensor, y: torch.Tensor, accumulate: bool, glu: bool = False,
                   norm: tuple[torch.Tensor, float] | None = None, q8: bool = False,
                   per_block: int = 0, rope: RopeStore | None = None, row: int = 0) -> torch.Tensor:
        """One launch over x2's rows: each grid row of blocks takes ``per_block`` of them (0: all;
        the one-row kernel for 1, else the x8 kernel). y may be f32 for x of another dtype
        (out_f32); ``row``: x2's first row within the rows ``rope`` describes."""
        n, k = y.shape[1], self.w.k  # n: outputs (half the weight rows with glu)
        rows = x2.shape[0]
        m = per_block or rows  # x rows per block
        name = (f"gemv_{self._q}_{ACT[x2.dtype]}{'' if m == 1 else '_x8'}{'' if norm is None else '_norm'}"
                f"{'_q8' if q8 else ''}")
        kern = get_kernel(self._gemv, name, device_index(x2))
        # the norm's weight, eps and the rms_norm kernel's thread count (its summation order)
        nw, eps, nt = (None, 0.0, 0) if norm is None else (*norm, ops.rms_threads(k))
        # shared memory: the int8 rows, or the normalized rows
        smem = m * self._q8_row if q8 else (0 if norm is None else m * k * x2.element_size())
        blocks = min(self._row_blocks(glu), self._resident(kern, x2, smem))
        launch(kern, (blocks, rows // m), (32 * GEMV_WARPS,),
               (*self.w.planes, x2, y, np.int32(n), np.int32(k), np.int32(m), np.int64(x2.stride(0)),
                np.int64(y.stride(0)), np.float32(self.w.alpha), np.int32(1 if accumulate else 0),
                np.int32(self._wpr), np.int32(1 if glu else 0), nw, np.float32(eps), np.int32(nt),
                np.int32(y.dtype != x2.dtype), *(NO_ROPE_STORE if rope is None else rope.args(row))),
               like=x2, shmem=smem)
        return y

    _resident_cache: dict[tuple[int, int], int] = {}

    @classmethod
    def _resident(cls, kern, like: torch.Tensor, smem: int = 0) -> int:
        """Blocks of this GEMV that fit on the GPU at once (the persistent grid size)."""
        key = (id(kern), smem)
        got = cls._resident_cache.get(key)
        if got is None:
            idx = device_index(like)
            sms = torch.cuda.get_device_properties(idx).multi_processor_count
            try:
                per_sm = int(kern.occupancy.max_active_blocks_per_multiprocessor(32 * GEMV_WARPS, smem))
            except Exception:  # occupancy query unavailable: a safe guess
                per_sm = 2
            got = cls._resident_cache[key] = max(1, per_sm) * sms
        return got

    def _gemm_call(self, x2: torch.Tensor, out: torch.Tensor | None, accumulate: bool) -> torch.Tensor:
        n, k = self.w.n, self.w.k
        m = x2.shape[0]
        mt = self._gemm_type(x2.dtype)
        tdt = torch.float16 if mt == "f16" else torch.bfloat16
        xin = x2 if x2.dtype == tdt else x2.to(tdt)  # documented: prefill operands in the MMA type
        direct = out is not None and out.dtype == tdt
        y = out.view(m, n) if direct else torch.empty((m, n), dtype=tdt, device=x2.device)
        add = accumulate and direct  # otherwise added below, in out's dtype
        kern = get_kernel(self._gemm[mt], f"gemm_{self._q}_{mt}", device_index(x2))
        launch(kern, ((n + 63) // 64, (m + 63) // 64), (128,),
               (*self.w.planes, xin, y, np.int32(m), np.int32(n), np.int32(k), np.int64(xin.stride(0)),
                np.int64(n), np.float32(self.w.alpha), np.int32(1 if add else 0)), like=x2)
        if direct:
            return out
        if out is not None:
            if accumulate:
                out.view(m, n).add_(y.to(out.dtype))
            else:
                out.view(m, n).copy_(y)
            return out
        return y if y.dtype == x2.dtype else y.to(x2.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.w.n, self.w.k
        dev = next(p for p in self.w.planes if p is not None)
        out = torch.empty((n, k), dtype=torch.float32, device=dev.device)
        kern = get_kernel(self._gemv, f"dequant_{self._q}", device_index(dev))
        units = n * (k // 32)
        launch(kern, (min((units + 255) // 256, 65535),), (256,),
               (*self.w.planes, out, np.int32(n), np.int32(k), np.float32(self.w.alpha)), like=dev)
        return out if dtype == torch.float32 else out.to(dtype)


class DenseLinear:
    """F32/F16/BF16 weights: stored once in the compute dtype, multiplied by cuBLAS."""

    def __init__(self, w: torch.Tensor):
        self.weight = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
        y = torch.matmul(x.to(self.weight.dtype), self.weight.t()).to(x.dtype)
        if out is None:
            return y
        if accumulate:
            out.add_(y)
        else:
            out.copy_(y)
        return out


class CudaLinear:
    """The role object (luce_core.contract.roles.Linear). Its ``layer_ops`` run the rest of a
    layer as fused kernels, most of them inside this role's GEMVs (luce_cuda.layer_ops)."""

    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None, mma: str = "bf16"):
        from luce_cuda.layer_ops import CudaLayerOps  # it imports this module

        self.caps = caps
        self.mma = mma
        self.layer_ops = CudaLayerOps()
        self._dense: list[DenseLinear] = []  # the cuBLAS weights prepared
        self._exact: dict[int, bool] = {}  # exact_rows(m), until another weight is prepared

    def exact_rows(self, m: int) -> bool:
        """Up to GEMV_MAX_ROWS rows the quantized GEMVs round every row as decode by design (see
        QuantLinear.forward); cuBLAS weights are checked bit for bit on this GPU instead
        (``luce_core.plugin_api.rows_exact``), since its kernel choice may depend on the row count."""
        if m not in self._exact:
            self._exact[m] = m <= GEMV_MAX_ROWS and all(rows_exact(d.forward, d.weight, m) for d in self._dense)
        return self._exact[m]

    def prepare(self, w: QTensor, device: "torch.device", dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        device = torch.device(device)
        if w.qtype in DENSE:
            op = DenseLinear(_dense(w).to(device=device, dtype=dtype))
            self._dense.append(op)
            self._exact.clear()
            return op
        if w.qtype not in QUANTIZED:
            raise ConfigError(f"{w.name}: tensor type {w.qtype} has no CUDA kernel",
                              remedy="force the torch implementation: LUCE_LINEAR=torch")
        op = QuantLinear(upload(w, device), self.mma)
        op.warmup(dtype)
        return op

    def dequantize(self, w: QTensor, device: "torch.device", dtype: torch.dtype) -> torch.Tensor:
        device = torch.device(device)
        if w.qtype in DENSE:
            return _dense(w).to(device=device, dtype=dtype)
        if len(w.shape) != 2:
            flat = QTensor(w.name, w.qtype, (int(np.prod(w.shape[:-1])), int(w.shape[-1])), w.data, w.scale)
            return self.dequantize(flat, device, dtype).reshape(w.shape)
        return QuantLinear(upload(w, device), self.mma).dequantize(dtype)


def make_bf16(caps: Caps, config: RunConfig) -> CudaLinear:
    """Impl "cuda": BF16 tensor cores for prefill (SM 8.0+)."""
    return CudaLinear(caps, config, mma="bf16")


def make_sm75(caps: Caps, config: RunConfig) -> CudaLinear:
    """Impl "cuda-sm75": FP16 WMMA prefill only (SM 7.5+, e.g. RTX 2080 Ti)."""
    return CudaLinear(caps, config, mma="f16")

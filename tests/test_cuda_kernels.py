"""luce_cuda kernels against the oracles.

CPU part (always runs): the planar weight layout is lossless, and a numpy model of the kernels'
unit decoding (same index math as kernels/quant.cuh) reproduces gguf.quants.dequantize.
GPU part (marked gpu, skipped without a CUDA torch and NVRTC): GEMV/GEMM vs gguf and
luce_core.formats.dequant, attention vs luce_torch's TorchAttention, the fused ops vs torch formulas,
the forced SM 7.5 path, and CUDA-graph capture of a decode step.
"""
from __future__ import annotations

import math
import warnings

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from luce_core.formats.blocks import BLOCKS
from luce_core.contract.types import KVSpec, QTensor
from luce_cuda.weights import PLANE_SLICES, split_planes
from gpu import GPU_REASON

QUANTS = tuple(PLANE_SLICES)
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}
NVFP4_SPECIAL = (0x00, 0x7F, 0xFF, 0x80, 0x01, 0x08, 0x77)


def random_blocks(qtype: str, n: int, k: int, seed: int, specials: list[int] = ()) -> np.ndarray:
    """uint8 [n, row_bytes] of random ggml blocks with finite fp16 scales of moderate size."""
    rng = np.random.default_rng(seed)
    elems, nbytes = BLOCKS[qtype]
    nb = n * (k // elems)
    b = rng.integers(0, 256, size=(nb, nbytes), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        d = rng.uniform(-0.05, 0.05, size=nb).astype(np.float16)
        b[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
    if qtype == "NVFP4":  # UE4M3 scales: keep them moderate, plus the special codes drawn
        b[:, :4] = rng.integers(0x20, 0x48, size=(nb, 4), dtype=np.uint8)
        for i, s in enumerate(specials):
            b[i % nb, i % 4] = s
    return b.reshape(n, -1)


def oracle(qtype: str, data: np.ndarray, n: int, k: int, scale: float = 1.0) -> np.ndarray:
    w = gguf.quants.dequantize(data.reshape(-1), gguf.GGMLQuantizationType[qtype]).reshape(n, k)
    return w.astype(np.float64) * scale


# ----------------------------------------------------------------------------- CPU: layout
def _mirror(qtype: str, planes: list, n: int, k: int) -> np.ndarray:
    """numpy model of FQ*::decode (kernels/quant.cuh): per 32-weight unit, runs of q with s, o."""
    p0, p1, p2, p3 = planes
    out = np.zeros((n, k), np.float32)
    f16 = lambda a: a.view(np.float16).astype(np.float32)  # noqa: E731
    for u in range(k // 32):
        if qtype in ("Q4_0", "Q4_1"):
            v = p0[:, u * 16:u * 16 + 16]
            q = np.concatenate([v & 15, v >> 4], 1).astype(np.float32)
            if qtype == "Q4_0":
                d = f16(np.ascontiguousarray(p2[:, u * 2:u * 2 + 2]))
                vals = d * (q - 8)
            else:
                dm = f16(np.ascontiguousarray(p2[:, u * 4:u * 4 + 4]))
                vals = dm[:, :1] * q + dm[:, 1:]
            out[:, u * 32:u * 32 + 32] = vals
        elif qtype == "Q8_0":
            q = p0[:, u * 32:u * 32 + 32].view(np.int8).astype(np.float32)
            out[:, u * 32:u * 32 + 32] = f16(np.ascontiguousarray(p2[:, u * 2:u * 2 + 2])) * q
        elif qtype == "Q4_K":
            b, c, j = u // 8, (u % 8) // 2, u % 2
            k0 = b * 256 + 64 * c + 16 * j
            v = p0[:, u * 16:u * 16 + 16]
            hdr = p2[:, b * 16:b * 16 + 16]
            d, dmin = f16(np.ascontiguousarray(hdr[:, 0:2])), f16(np.ascontiguousarray(hdr[:, 2:4]))
            sc = hdr[:, 4:16].astype(np.int32)
            for r, sb in enumerate((2 * c, 2 * c + 1)):
                if sb < 4:
                    s_, m_ = sc[:, sb] & 63, sc[:, sb + 4] & 63
                else:
                    s_ = (sc[:, sb + 4] & 15) | ((sc[:, sb - 4] >> 6) << 4)
                    m_ = (sc[:, sb + 4] >> 4) | ((sc[:, sb] >> 6) << 4)
                q = ((v & 15) if r == 0 else (v >> 4)).astype(np.float32)
                out[:, k0 + 32 * r:k0 + 32 * r + 16] = (d * s_[:, None]) * q - (dmin * m_[:, None])
        elif qtype == "Q6_K":
            b, h, p, j = u // 8, (u // 4) % 2, (u // 2) % 2, u % 2
            k0 = b * 256 + h * 128 + 32 * p + 16 * j
            ql = p0[:, u * 16:u * 16 + 16].astype(np.int32)
            qh = p1[:, b * 64 + h * 32 + 16 * j:b * 64 + h * 32 + 16 * j + 16].astype(np.int32)
            d = f16(np.ascontiguousarray(p3[:, b * 2:b * 2 + 2]))
            sc = p2.view(np.int8)[:, b * 16 + h * 8 + j + 2 * p].astype(np.float32)[:, None]
            sc2 = p2.view(np.int8)[:, b * 16 + h * 8 + j + 2 * p + 4].astype(np.float32)[:, None]
            q0 = ((ql & 15) | (((qh >> (2 * p)) & 3) << 4)) - 32
            q1 = ((ql >> 4) | (((qh >> (2 * p + 4)) & 3) << 4)) - 32
            out[:, k0:k0 + 16] = (d * sc) * q0
            out[:, k0 + 64:k0 + 80] = (d * sc2) * q1
        else:  # NVFP4
            kv = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)
            v = p0[:, u * 16:u * 16 + 16]
            for r in range(2):
                x = p2[:, u * 2 + r].astype(np.int32)
                e, m = (x >> 3) & 15, (x & 7).astype(np.float32)
                val = np.where(e == 0, m / 512.0, (1 + m / 8) * np.exp2(e.astype(np.float32) - 7)) * 0.5
                val = np.where((x == 0) | (x == 0x7F), 0.0, val).astype(np.float32)[:, None]
                byt = v[:, 8 * r:8 * r + 8]
                q = np.concatenate([kv[byt & 15], kv[byt >> 4]], 1)
                out[:, u * 32 + 16 * r:u * 32 + 16 * r + 16] = val * q
    return out


@settings(max_examples=30, deadline=None)
@given(qtype=st.sampled_from(QUANTS), n=st.integers(1, 5), blocks=st.integers(1, 3), seed=st.integers(0, 2**31),
       specials=st.lists(st.sampled_from(NVFP4_SPECIAL), max_size=6))
def test_planar_layout_is_lossless_and_decodes_like_gguf(qtype, n, blocks, seed, specials):
    elems, nbytes = BLOCKS[qtype]
    k = blocks * elems
    data = random_blocks(qtype, n, k, seed, specials)
    planes = split_planes(qtype, data, n, k)
    # lossless: the planes put back together are the original block bytes
    per_block = [None if p is None else p.reshape(n, blocks, -1) for p in planes]
    rebuilt = np.zeros((n, blocks, nbytes), np.uint8)
    for p, sl in zip(per_block, PLANE_SLICES[qtype], strict=True):
        if sl is not None:
            rebuilt[:, :, sl[0]:sl[1]] = p
    assert np.array_equal(rebuilt.reshape(n, -1), data)
    assert all(p is None or (p.flags.c_contiguous and p.shape[0] == n) for p in planes)
    # the kernels' unit index math reproduces the oracle (tolerance: FMA contraction, 1 ulp)
    ref = oracle(qtype, data, n, k).astype(np.float32)
    np.testing.assert_allclose(_mirror(qtype, planes, n, k), ref, rtol=2e-7, atol=1e-30)


# ----------------------------------------------------------------------------- GPU
ACT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
GEMM_TOL = {"f16": 3e-3, "bf16": 2e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite output"
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _qtensor(qtype: str, n: int, k: int, seed: int, scale: float = 1.0) -> QTensor:
    return QTensor(f"w.{qtype}", qtype, (n, k), random_blocks(qtype, n, k, seed, list(NVFP4_SPECIAL)), scale)


def _refs(w: QTensor) -> torch.Tensor:
    """gguf's dequantization, checked against luce_core.formats.dequant on the way (both oracles)."""
    from luce_core.formats.dequant import dequantize_qtensor

    g = torch.from_numpy(oracle(w.qtype, np.asarray(w.data), *w.shape, scale=w.scale))
    t = dequantize_qtensor(w).double()
    assert torch.equal(g, t) or rel_err(t, g) < 1e-7
    return g


@pytest.fixture(autouse=True, scope="module")
def _int8_on_every_shape():
    """The int8-activation GEMVs serve large weights only; here every shape takes them, so
    the hypothesis shapes exercise them too (the threshold itself: test_int8_activations_where...)."""
    if GPU_REASON:
        yield
        return
    from luce_cuda import linear

    _REAL["int8_pays"] = linear.int8_pays
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear, "int8_pays", lambda n, k: True)
        yield


_REAL: dict = {}


def _seen(lin, x: torch.Tensor, gemv: bool = True) -> torch.Tensor:
    """x as the kernel multiplies it, in float64 on the CPU: rounded to int8 per 32
    (luce_core.formats.act_quant) where the GEMV quantizes activations, else exactly x."""
    from luce_core.formats.act_quant import dequantize_act_q8

    return dequantize_act_q8(x.cpu()) if gemv and lin.int8_activations(x.dtype) else x.double().cpu()


shape_st = st.tuples(st.sampled_from(QUANTS), st.integers(1, 200), st.integers(1, 4), st.integers(0, 2**31))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=shape_st, m=st.sampled_from([1, 1, 2, 5, 17, 64, 130]))
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_linear_matches_dequant_oracles(dtype, case, m):
    from luce_cuda.linear import CudaLinear, GEMV_MAX_ROWS

    qtype, n, blocks, seed = case
    elems = BLOCKS[qtype][0]
    k = blocks * max(elems, 64)  # exercise K not a multiple of the 128-wide GEMM tile
    scale = 0.37 if qtype == "NVFP4" else 1.0
    w = _qtensor(qtype, n, k, seed, scale)
    ref_w = _refs(w)
    lin = CudaLinear(mma="bf16").prepare(w, torch.device("cuda"), dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
    y = lin(x)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = _seen(lin, x, m <= GEMV_MAX_ROWS) @ ref_w.T
    tol = ACT_TOL[dtype] if m == 1 else GEMM_TOL["f16" if dtype == torch.float16 else "bf16"]
    # relative error, plus the deterministic bound of an f32 dot product of length k (k u |x||W|)
    # for outputs that cancel: any summation order the compiler picks stays within it
    err = float((y.cpu().double() - ref).norm())
    bound = k * 2.0**-24 * float((x.double().abs().cpu() @ ref_w.abs().T).norm())
    assert torch.isfinite(y).all() and err < tol * float(ref.norm()) + bound, (qtype, n, k, m, rel_err(y.cpu(), ref))
    # accumulate into an output (residual fusion)
    base = torch.randn(m, n, device="cuda").to(dtype)
    got = lin.forward(x, out=base.clone(), accumulate=True).cpu()
    assert torch.isfinite(got).all()
    # relative to the operands: y + base may cancel to almost nothing
    scale = float(ref.norm() + base.double().norm())
    assert float((got.double() - ref - base.double().cpu()).norm()) < 2 * tol * scale + bound


@settings(max_examples=30, deadline=None)
@given(case=shape_st, m=st.sampled_from([1, 3, 8, 11, 40]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_linear_glu_epilogue(case, m, dtype):
    """forward(glu=True) on W = [gate; up] is silu(x gate^T) * (x up^T) in f64 (GEMV: in its
    epilogue; over 32 rows: GEMM then the op); the GEMV's result is bit-identical to the unfused
    GEMV + SwiGLU kernel, and each verify row to the same row alone (the decode step), so
    speculative verify stays lossless."""
    from luce_cuda.linear import CudaLinear, GEMV_MAX_ROWS

    qtype, n, blocks, seed = case
    k = blocks * max(BLOCKS[qtype][0], 64)
    scale = 0.37 if qtype == "NVFP4" else 1.0
    w = _qtensor(qtype, 2 * n, k, seed, scale)
    ref_w = _refs(w)
    lin = CudaLinear(mma="bf16").prepare(w, torch.device("cuda"), dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    x *= 4 / float((x @ ref_w.T).abs().max().clamp_min(1e-6))  # gate and up within +-4: f16 holds the product
    x = x.to("cuda", dtype)
    gu = _seen(lin, x, m <= GEMV_MAX_ROWS) @ ref_w.T
    ref = F.silu(gu[:, :n]) * gu[:, n:]
    got = lin.forward(x, glu=True)
    assert got.shape == (m, n) and got.dtype == dtype
    tol = 2 * (ACT_TOL[dtype] if m <= GEMV_MAX_ROWS else GEMM_TOL["f16" if dtype == torch.float16 else "bf16"])
    # error against the operands' scale (a single output may be ~0: silu of a large negative gate),
    # plus what an f32 dot product of length k may lose to cancellation (k u |x||W|), carried
    # through silu(g) * u (|d/dg| <= 1.1 |u|, |d/du| = |silu(g)| <= |g|)
    err = float((got.double().cpu() - ref).abs().max())
    dot = k * 2.0**-24 * float((x.double().abs().cpu() @ ref_w.abs().T).max())
    bound = tol * max(float(ref.abs().max()), 1.0) + dot * 2.2 * float(gu.abs().max())
    assert torch.isfinite(got).all() and err < bound, (qtype, n, k, m, err, bound)
    if m <= GEMV_MAX_ROWS:
        # fusing changes no bit: the unfused GEMV + SwiGLU kernel give the same output
        from luce_cuda import ops

        gu = lin(x)
        torch.testing.assert_close(got, ops.swiglu(gu[:, :n], gu[:, n:]), rtol=0, atol=0)
        for j in (0, m - 1):
            torch.testing.assert_close(lin.forward(x[j:j + 1], glu=True), got[j:j + 1], rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(case=shape_st, m=st.sampled_from([1, 3, 8, 11, 40]), glu=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       rowpar=st.sampled_from(["auto", "0", "1", "4"]))
# found on an H200: f32 accumulate was contracted into one FMA (product + residual, one rounding)
@example(case=("NVFP4", 1, 1, 0), m=3, glu=False, dtype=torch.float32, rowpar="auto")
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_linear_fused_norm_and_residual_change_no_bit(case, m, glu, dtype, rowpar):
    """forward(norm=(w, eps)) is ops.rms_norm then forward, bit for bit: the GEMV normalizes its
    rows in shared memory in the rms_norm kernel's summation order, all of a block's rows at once
    (over 32 rows the norm kernel runs first). forward(out=r, accumulate=True) is r + forward(x),
    bit for bit, on the GEMV and the GEMM paths. Each fused row still rounds as a one-row decode
    step, whatever the rows per block."""
    import os

    from luce_cuda import ops
    from luce_cuda.linear import CudaLinear, GEMV_MAX_ROWS

    os.environ["LUCE_GEMV_ROWPAR"] = rowpar
    try:
        qtype, n, blocks, seed = case
        k = blocks * max(BLOCKS[qtype][0], 64)
        scale = 0.37 if qtype == "NVFP4" else 1.0
        w = _qtensor(qtype, 2 * n if glu else n, k, seed, scale)
        lin = CudaLinear(mma="bf16").prepare(w, torch.device("cuda"), dtype)
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(m, k, generator=g) * 3).to("cuda", dtype)
        nw = (torch.rand(k, generator=g) + 0.5).to("cuda")
        # scaled so the products stay within +-4: f16 holds them (and silu(gate) * up)
        h = ops.rms_norm(x.float(), nw, 1e-5).double().cpu()
        nw *= 4 / float((h @ _refs(w).T).abs().max().clamp_min(1e-6))
        got = lin.forward(x, glu=glu, norm=(nw, 1e-5))
        want = lin.forward(ops.rms_norm(x, nw, 1e-5), glu=glu)
        assert got.shape == (m, n) and torch.isfinite(got).all()
        assert torch.equal(got, want), f"max diff {(got.float() - want.float()).abs().max()}"
        if m <= GEMV_MAX_ROWS:  # (the GEMM path rounds differently from a one-row GEMV anyway)
            for j in (0, m - 1):
                assert torch.equal(lin.forward(x[j:j + 1], glu=glu, norm=(nw, 1e-5)), got[j:j + 1])
        if not glu:
            base = torch.randn(m, n, generator=g).to("cuda", dtype)
            out = base.clone()
            lin.forward(x, out=out, accumulate=True)
            assert torch.equal(out, base + lin(x))
    finally:
        os.environ.pop("LUCE_GEMV_ROWPAR", None)


@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_layer_ops_linear_glu_matches_unfused():
    """CudaLayerOps.linear(glu=True): one GEMV on a luce_cuda weight, a GEMV then the SwiGLU
    kernel on a plain callable; both equal TorchLayerOps' op sequence."""
    from luce_core.layer_ops import TORCH_LAYER_OPS
    from luce_cuda.layer_ops import CudaLayerOps
    from luce_cuda.linear import CudaLinear

    lin = CudaLinear(mma="bf16").prepare(_qtensor("Q4_0", 96, 256, 7), torch.device("cuda"), torch.float32)
    x = torch.randn(1, 256, device="cuda")
    ref = TORCH_LAYER_OPS.linear(lin, x, glu=True)
    assert ref.shape == (1, 48)
    assert rel_err(CudaLayerOps().linear(lin, x, glu=True), ref) < 1e-5
    assert rel_err(CudaLayerOps().linear(lambda h: lin(h), x, glu=True), ref) < 1e-5


@pytest.mark.parametrize("k", [4096, 8192, 16384])  # 2, 4 and 8 warps share a row group
@pytest.mark.parametrize("qtype", QUANTS)
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_gemv_split_over_warps(qtype, k):
    from luce_cuda.linear import CudaLinear

    w = _qtensor(qtype, 37, k, k + len(qtype))
    ref_w = _refs(w)
    for dtype in (torch.float16, torch.float32):
        lin = CudaLinear().prepare(w, torch.device("cuda"), dtype)
        assert lin._wpr == {4096: 2, 8192: 4, 16384: 8}[k]
        x = torch.randn(1, k).to("cuda", dtype)
        assert rel_err(lin(x).cpu(), _seen(lin, x) @ ref_w.T) < ACT_TOL[dtype]


@pytest.mark.parametrize("rowpar", ["0", "1", "4"])  # chunks of 8; per grid row 1 or 4 rows
@pytest.mark.parametrize("m", [2, 5, 8, 9, 17, 32])
@pytest.mark.parametrize("qtype", QUANTS)
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_few_row_gemv_rounds_each_row_as_decode(qtype, m, rowpar, monkeypatch):
    """A verify's few rows (chunks of up to 8 per launch, or grid rows of 1 or 4 side by side) give,
    bit for bit, what one-row decode steps give: speculative decoding stays lossless in f16/bf16,
    not only in f32."""
    from luce_cuda.linear import CudaLinear

    monkeypatch.setenv("LUCE_GEMV_ROWPAR", rowpar)

    k = 4096 if qtype not in ("Q4_K", "Q6_K") else 2048
    w = _qtensor(qtype, 300, k, m + 7 * len(qtype))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        lin = CudaLinear().prepare(w, torch.device("cuda"), dtype)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to("cuda", dtype)
        rows = torch.cat([lin(x[i:i + 1]) for i in range(m)])
        both = lin(x)
        assert torch.isfinite(both).all()
        assert torch.equal(both, rows), f"{qtype} {dtype}: max diff {(both.float() - rows.float()).abs().max()}"
        assert rel_err(both.cpu(), _seen(lin, x) @ _refs(w).T) < ACT_TOL[dtype]


@pytest.mark.parametrize("n, k", [(20011, 256), (5001, 8192)])
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_gemv_persistent_grid_walks_all_rows(n, k):
    """More row groups than resident blocks: each block loops; every row is written once."""
    from luce_cuda.linear import CudaLinear

    w = _qtensor("Q4_0", n, k, n)
    lin = CudaLinear().prepare(w, torch.device("cuda"), torch.float16)
    x = torch.randn(1, k).to("cuda", torch.float16)
    y = torch.full((1, n), float("nan"), device="cuda", dtype=torch.float16)  # poison
    lin.forward(x, out=y)
    assert rel_err(y.cpu(), _seen(lin, x) @ _refs(w).T) < ACT_TOL[torch.float16]


@pytest.mark.parametrize("qtype", QUANTS)
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_int8_activations_where_and_how_much(qtype, monkeypatch):
    """Q4_0/Q4_1/Q8_0 GEMVs of 2^22+ weights and N >= K quantize f16/bf16 activations to int8
    (never f32 ones, never the K-quants or NVFP4); against the exact product that costs under
    1.5 % (ggml's q8 rounding), and ``LUCE_GEMV_Q8=0`` turns it off (float then matches closer)."""
    from luce_cuda import linear
    from luce_cuda.linear import CudaLinear

    monkeypatch.setattr(linear, "int8_pays", _REAL["int8_pays"])  # the real rule, not the fixture's
    for n, k in ((2047, 2048), (2048, 4096)):  # fewer rows than columns, or under 2^22 weights
        small = CudaLinear().prepare(_qtensor(qtype, n, k, 3), torch.device("cuda"), torch.bfloat16)
        assert not small.int8_activations(torch.bfloat16)
    k = 2048
    w = _qtensor(qtype, 2048, k, 3)
    ref_w = _refs(w)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        lin = CudaLinear().prepare(w, torch.device("cuda"), dtype)
        assert lin.int8_activations(dtype) == (qtype in ("Q4_0", "Q4_1", "Q8_0") and dtype != torch.float32)
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
        exact = x.double().cpu() @ ref_w.T
        got = lin(x)
        assert rel_err(got.cpu(), exact) < (1.5e-2 if lin.int8_activations(dtype) else ACT_TOL[dtype])
        if lin.int8_activations(dtype):
            monkeypatch.setenv("LUCE_GEMV_Q8", "0")
            assert not lin.int8_activations(dtype)
            off = lin(x)
            monkeypatch.delenv("LUCE_GEMV_Q8")
            assert rel_err(off.cpu(), exact) < ACT_TOL[dtype] and not torch.equal(off, got)


@settings(max_examples=20, deadline=None)
@given(case=shape_st)
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_dequantize_kernel_matches_gguf(case):
    from luce_cuda.linear import CudaLinear

    qtype, n, blocks, seed = case
    k = blocks * BLOCKS[qtype][0]
    w = _qtensor(qtype, n, k, seed, 0.5 if qtype == "NVFP4" else 1.0)
    got = CudaLinear().dequantize(w, torch.device("cuda"), torch.float32)
    ref = _refs(w)
    torch.testing.assert_close(got.cpu().double(), ref, rtol=3e-7, atol=1e-30)


@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_forced_sm75_path_runs_here(monkeypatch):
    """LUCE_CAPS=cc=7.5 selects cuda-sm75 (FP16 WMMA), which also runs on a newer GPU."""
    from luce_core.caps import probe
    from luce_core.config import RunConfig
    from luce_core.plugin_host import host
    from luce_core.selection import select

    monkeypatch.setenv("LUCE_CAPS", "cc=7.5")
    caps = probe()
    ours = [i for i in host().impls("linear") if i.plugin in ("cuda", "torch")]
    impl = select("linear", ours, caps, RunConfig(weight_types={"Q4_0", "Q6_K"}))
    assert impl.name == "cuda-sm75"
    lin_role = impl.create(caps, RunConfig())
    for qtype in ("Q4_0", "Q6_K", "NVFP4"):
        w = _qtensor(qtype, 96, 512, 7)
        ref_w = _refs(w)
        for dtype in (torch.bfloat16, torch.float16):
            lin = lin_role.prepare(w, torch.device("cuda"), dtype)
            assert lin.mma == "f16"
            x = torch.randn(33, 512).to("cuda", dtype)
            assert rel_err(lin(x).cpu(), x.double().cpu() @ ref_w.T) < (GEMM_TOL["f16"] if dtype == torch.float16
                                                                         else GEMM_TOL["bf16"])
    att = select("attention", [i for i in host().impls("attention") if i.plugin in ("cuda", "torch")], caps,
                 RunConfig(kv_k="bf16", kv_v="bf16"))
    assert att.name == "cuda"  # FP16 mma.sync serves f16 and bf16 caches on SM 7.5 too


# ----------------------------------------------------------------------------- attention
def _store(n_layers, cap, hkv, d, dtype: str):
    from luce_torch.kv import TorchKVStore

    spec = KVSpec(n_layers, hkv, d, cap, dtype, dtype, device="cuda", compute_dtype=dtype)
    return TorchKVStore(spec)


att_st = st.tuples(st.sampled_from([(9, 3), (8, 8), (32, 8), (16, 1), (12, 4)]), st.sampled_from([64, 128]),
                   st.sampled_from(["f16", "bf16"]), st.integers(0, 2**31))


@settings(max_examples=25, deadline=None)
@given(case=att_st, start=st.integers(0, 1400), t=st.sampled_from([1, 1, 1, 2, 7, 64, 65, 150]),
       sharp=st.sampled_from([0.5, 1.0, 2.5]))
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_attention_matches_torch_reference(case, start, t, sharp):
    from luce_cuda.attention import CudaAttention
    from luce_torch.attention import TorchAttention

    (h, hkv), d, kvdt, seed = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.float16 if kvdt == "f16" else torch.bfloat16
    store = _store(2, start + t + 5, hkv, d, kvdt)
    k = torch.randn(start + t, hkv, d, device="cuda", generator=g).to(dt)
    v = torch.randn(start + t, hkv, d, device="cuda", generator=g).to(dt)
    store.write(1, 0, k, v)
    store.set_length(start + t)
    q = torch.randn(t, h, d, device="cuda", generator=g).to(dt) * 2
    scale = sharp / math.sqrt(d)
    att = CudaAttention()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel path must be taken: no fallback warning
        got = att.forward(q, store, 1, start, scale=scale)
    ref = TorchAttention().forward(q.float(), _float_view(store), 1, start, scale=scale)
    assert got.shape == (t, h, d) and got.dtype == dt
    # FP16 operands (also for bf16 caches), FP32 softmax; bf16 output rounding dominates there
    assert rel_err(got.float(), ref) < (4e-3 if kvdt == "f16" else 6e-3), (h, hkv, d, kvdt, start, t)


def _float_view(store):
    """The same cache read back in f32, for an f32 reference."""
    class View:
        def read(self, layer, end):
            k, v = store.read(layer, end)
            return k.float(), v.float()

        def rotate_query(self, q):
            return q
    return View()


@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_attention_fallbacks_agree_with_reference():
    from luce_cuda.attention import CudaAttention
    from luce_torch.attention import TorchAttention

    store = _store(1, 64, 2, 96, "f32")  # no kernel for head_dim 96
    k = torch.randn(40, 2, 96, device="cuda")
    store.write(0, 0, k, k.flip(0))
    q = torch.randn(8, 4, 96, device="cuda")
    with pytest.warns(UserWarning, match="head_dim 96"):
        got = CudaAttention().forward(q, store, 0, 32, scale=0.125)
    torch.testing.assert_close(got, TorchAttention().forward(q, store, 0, 32, scale=0.125))
    # a mask that hides prefix slots is not a tree mask: the reference serves it (head_dim 64 here,
    # so the mask is the only reason)
    store = _store(1, 64, 2, 64, "f32")
    store.write(0, 0, k[..., :64], k.flip(0)[..., :64])
    q = q[..., :64].contiguous()
    mask = torch.rand(8, 40, device="cuda") > 0.5
    mask[:, 0] = True
    mask[0, 1] = False
    with pytest.warns(UserWarning, match="hides part of the prefix"):
        got = CudaAttention().forward(q, store, 0, 32, scale=0.125, mask=mask)
    torch.testing.assert_close(got, TorchAttention().forward(q, store, 0, 32, scale=0.125, mask=mask))


@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_decode_step_is_graph_capturable():
    """GEMV + RMSNorm + RoPE + flash-decode captured once; replays follow a device-side length."""
    from luce_cuda import ops
    from luce_cuda.linear import CudaLinear

    torch.manual_seed(0)
    hkv, h, d, cap = 2, 4, 64, 1024
    w = _qtensor("Q4_0", h * d, 256, 3)
    lin = CudaLinear().prepare(w, torch.device("cuda"), torch.float16)
    kc = torch.randn(cap, hkv, d, device="cuda").half()
    vc = torch.randn(cap, hkv, d, device="cuda").half()
    x = torch.randn(1, 256, device="cuda").half()
    nw = torch.rand(256, device="cuda") + 0.5
    inv = ops.rope_inv_freq(d, 10000.0, "cuda")
    length = torch.tensor([10], dtype=torch.int32, device="cuda")
    pos = torch.tensor([9], dtype=torch.int32, device="cuda")
    ws = ops.DecodeWorkspace(h, d, cap, "cuda")
    out = torch.empty(1, h, d, device="cuda").half()

    def step():
        xn = ops.rms_norm(x, nw, 1e-6)
        q = lin(xn).view(1, h, d)
        ops.rope(q, inv, positions=pos)
        ops.flash_decode(q, kc, vc, length, 0.125, out=out, workspace=ws, max_len=cap)

    step()  # loads every kernel before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for n in (10, 300, 1000):
        length.fill_(n)
        pos.fill_(n - 1)
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        step()  # eager, same inputs
        torch.cuda.synchronize()
        torch.testing.assert_close(replayed, out, rtol=0, atol=0)
        q = lin(ops.rms_norm(x, nw, 1e-6)).view(1, h, d)
        ops.rope(q, inv, start=n - 1)
        kk = kc[:n].float().repeat_interleave(h // hkv, 1).transpose(0, 1)
        vv = vc[:n].float().repeat_interleave(h // hkv, 1).transpose(0, 1)
        ref = F.scaled_dot_product_attention(q.float().transpose(0, 1), kk, vv, scale=0.125).transpose(0, 1)
        assert rel_err(out.float(), ref) < 4e-3


# ----------------------------------------------------------------------------- fused ops
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 9), hid=st.sampled_from([64, 576, 2048, 4000]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), seed=st.integers(0, 2**31))
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_rms_norm_and_residual(rows, hid, dtype, seed):
    from luce_cuda import ops

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(rows, hid, device="cuda", generator=g) * 3).to(dtype)
    r = torch.randn(rows, hid, device="cuda", generator=g).to(dtype)
    w = torch.rand(hid, device="cuda", generator=g) + 0.5

    def ref(h):
        h = h.double()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

    tol = ACT_TOL[dtype] * 2
    assert rel_err(ops.rms_norm(x, w, 1e-5).cpu(), ref(x).cpu()) < tol
    res = r.clone()
    got = ops.add_rms_norm(x, res, w, 1e-5)
    summed = (x.float() + r.float()).to(dtype)
    torch.testing.assert_close(res, summed, rtol=0, atol=0)  # residual updated in place
    assert rel_err(got.cpu(), ref(summed).cpu()) < tol


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 40), nh=st.integers(1, 9), d=st.sampled_from([64, 128]), partial=st.booleans(),
       style=st.sampled_from(["normal", "neox"]), start=st.integers(0, 5000),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_rope_styles(t, nh, d, partial, style, start, dtype):
    from luce_cuda import ops

    rd = d // 2 if partial else d
    inv = ops.rope_inv_freq(rd, 10000.0, "cuda")
    x = torch.randn(t, nh, d, device="cuda").to(dtype)
    pos = torch.arange(start, start + t, device="cuda", dtype=torch.int32)
    got = ops.rope(x.clone(), inv, style=style, positions=pos)
    got2 = ops.rope(x.clone(), inv, style=style, start=start)
    torch.testing.assert_close(got, got2, rtol=0, atol=0)
    # reference: the angle as the kernel forms it (f32 product, like ggml), the rotation in f64
    ang = (pos.float()[:, None] * inv[None, :]).double()
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    xd = x.double()
    ref = xd.clone()
    if style == "normal":
        a, b = xd[..., 0:rd:2], xd[..., 1:rd:2]
        ref[..., 0:rd:2], ref[..., 1:rd:2] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = xd[..., :rd // 2], xd[..., rd // 2:rd]
        ref[..., :rd // 2], ref[..., rd // 2:rd] = a * cos - b * sin, a * sin + b * cos
    assert rel_err(got.cpu(), ref.cpu()) < ACT_TOL[dtype] * 2 + 1e-6
    torch.testing.assert_close(got[..., rd:], x[..., rd:], rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 33), f=st.sampled_from([1, 7, 1536, 8192]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_swiglu_on_fused_gate_up(rows, f, dtype):
    from luce_cuda import ops

    gu = (torch.randn(rows, 2 * f, device="cuda") * 3).to(dtype)
    gate, up = gu[:, :f], gu[:, f:]
    got = ops.swiglu(gate, up)
    ref = F.silu(gate.double()) * up.double()
    assert rel_err(got.cpu(), ref.cpu()) < ACT_TOL[dtype] * 2 + 1e-6


@settings(max_examples=40, deadline=None)
@given(qtype=st.sampled_from(QUANTS), m=st.sampled_from([1, 2, 5, 8, 11, 20]), heads=st.sampled_from([(1, 1), (3, 1), (4, 2)]),
       d=st.sampled_from([64, 128]), partial=st.booleans(), caches=st.sampled_from([("f16", "f16"), ("bf16", "f32"),
                                                                                    ("f32", "bf16")]),
       as_tensor=st.booleans(), rowpar=st.sampled_from(["0", "1", "4"]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), seed=st.integers(0, 2**31))
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_qkv_gemv_rope_store_is_gemv_then_write_rotary(qtype, m, heads, d, partial, caches, as_tensor, rowpar, dtype,
                                                      seed):
    """RoPE and the KV append in the QKV GEMV's epilogue (decode, x8 chunks, rows side by side):
    y (q rotated, k and v as projected) and the cache bytes equal the GEMV followed by the KV
    store's fused append, bit for bit, with RoPE positions independent of the slots."""
    import os

    from luce_core import rope
    from luce_core.contract.types import KVSpec
    from luce_cuda import ops
    from luce_cuda.kv import CudaKVStorage
    from luce_cuda.linear import CudaLinear

    os.environ["LUCE_GEMV_ROWPAR"] = rowpar
    try:
        g = torch.Generator().manual_seed(seed)
        hq, hk = heads
        k_in = 256
        n = (hq + 2 * hk) * d
        w = _qtensor(qtype, n, k_in, seed % 1000, 0.37 if qtype == "NVFP4" else 1.0)
        lin = CudaLinear(mma="bf16").prepare(w, torch.device("cuda"), dtype)
        x = torch.randn(m, k_in, generator=g).to("cuda", dtype)
        nw = (torch.rand(k_in, generator=g) + 0.5).to("cuda")
        nw *= 2 / float((ops.rms_norm(x.float(), nw, 1e-5).double().cpu() @ _refs(w).T).abs().max().clamp_min(1e-6))
        rd = d // 2 if partial else d
        cos, sin = rope.rope_tables((10000.0 ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)).float(), 96,
                                    torch.device("cuda"))
        positions = torch.randint(0, 96, (m,), generator=g).cuda()
        cap = m + 9
        slots = torch.randperm(cap, generator=g)[:m].cuda() if as_tensor else int(torch.randint(0, 9, (1,), generator=g))
        stores = [CudaKVStorage().allocate(KVSpec(n_layers=2, n_kv_heads=hk, head_dim=d, capacity=cap, k_dtype=caches[0],
                                                  v_dtype=caches[1], rotation=True, device="cuda",
                                                  compute_dtype="f16")) for _ in range(2)]
        rs = stores[0].rope_store_args(1, slots, positions, cos, sin, "normal", hq * d, dtype)
        assert rs is not None
        fused = lin.forward(x, norm=(nw, 1e-5), rope=rs)
        want = lin.forward(x, norm=(nw, 1e-5))
        q, kk, v = (t.view(m, -1, d) for t in (want[:, :hq * d], want[:, hq * d:(hq + hk) * d], want[:, (hq + hk) * d:]))
        assert stores[1].write_rotary(1, slots, q, kk, v, cos, sin, positions, "normal")
        assert torch.isfinite(fused).all()
        assert torch.equal(fused, want), f"max diff {(fused.float() - want.float()).abs().max()}"
        for a, b in ((stores[0].k, stores[1].k), (stores[0].v, stores[1].v)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert stores[0].k[1].any() and stores[0].v[1].any() and not stores[0].k[0].any()
    finally:
        os.environ.pop("LUCE_GEMV_ROWPAR", None)


@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_rope_store_refused_where_the_epilogue_cannot_write():
    """Quantized or rotated caches and neox RoPE keep the append kernel (None: the caller's
    fallback), and an int start beyond the capacity is the unfused write's error."""
    from luce_core import rope
    from luce_core.contract.errors import ContextOverflowError
    from luce_core.contract.types import KVSpec
    from luce_cuda.kv import CudaKVStorage

    cos, sin = rope.rope_tables(torch.ones(32), 8, torch.device("cuda"))
    pos = torch.zeros(2, dtype=torch.int64, device="cuda")

    def store(kd, vd, rot=False):
        return CudaKVStorage().allocate(KVSpec(n_layers=1, n_kv_heads=1, head_dim=64, capacity=4, k_dtype=kd,
                                               v_dtype=vd, rotation=rot, device="cuda", compute_dtype="f16"))

    assert store("f16", "f16").rope_store_args(0, 0, pos, cos, sin, "normal", 64, torch.float16) is not None
    assert store("q8_0", "f16", True).rope_store_args(0, 0, pos, cos, sin, "normal", 64, torch.float16) is None
    assert store("f16", "q4_0").rope_store_args(0, 0, pos, cos, sin, "normal", 64, torch.float16) is None
    assert store("f16", "f16").rope_store_args(0, 0, pos, cos, sin, "neox", 64, torch.float16) is None
    with pytest.raises(ContextOverflowError):
        store("f16", "f16").rope_store_args(0, 3, pos, cos, sin, "normal", 64, torch.float16)


@pytest.mark.parametrize("m", [1, 3, 8, 40])
@pytest.mark.parametrize("qtype", QUANTS)
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_f32_out_is_the_rounded_output_cast(qtype, m):
    """forward(out_f32=True) (the LM head's logits) is forward(x).float(), bit for bit, on the
    GEMV (one row, x8, rows side by side) and the GEMM paths."""
    from luce_cuda.linear import CudaLinear

    w = _qtensor(qtype, 300, 512, m)
    for dtype in (torch.float16, torch.bfloat16):
        lin = CudaLinear().prepare(w, torch.device("cuda"), dtype)
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to("cuda", dtype)
        nw = torch.rand(512, device="cuda") + 0.5
        got = lin.forward(x, norm=(nw, 1e-5), out_f32=True)
        assert got.dtype == torch.float32
        assert torch.equal(got, lin.forward(x, norm=(nw, 1e-5)).float())

"""luce_cuda's kv_storage "cuda": CudaKVStore writes TorchKVStore's bytes with one fused kernel.

CPU part (always runs): the plugin's reasons, and a CPU spec is refused with a ConfigError. That
KV_APPEND compiles for every arch is tests/test_cuda_compile.py's (it iterates programs.ALL).

GPU part (marked gpu, skipped without a CUDA torch and NVRTC), for every (k_dtype, v_dtype) of
the 5x5 KV dtype set and rotation on/off, hypothesis over T, heads, head_dim (64, 128, and the
generic 96, 256), source dtype, value patterns, strided sources and unique random slots:

* Against TorchKVStore on the CPU: identical bytes, every format. Exact by construction: every
  stored value comes from the same chain of correctly rounded f32 operations in both. Loads and
  the ±1 sign products are exact; each butterfly output is one add or sub of the same operands
  in fwht()'s order; 1/sqrt(g) is the same f32 factor; amax/127 and m/-8 are IEEE divisions and
  1/d an IEEE reciprocal of the f32 d; x*id and +8.5 round separately (the kernel uses
  __fmul_rn/__fadd_rn, so NVRTC cannot contract them into an FMA); roundf (halves away) and
  trunc are exact; f16/bf16 casts round to nearest even everywhere. There is no sum whose order
  could differ. The CPU store is byte-identical to gguf (tests/test_kv_storage.py), so this
  checks the kernel against ggml.
* Against TorchKVStore on the same CUDA device: floats and Q4_0 identical (m/-8 is exact either
  way). Q8_0 may differ in some blocks: torch on CUDA evaluates ``amax / 127`` (a Python-scalar
  divisor) as ``amax * fl(1/127)``, one f32 ulp off amax/127 for some amax, so 1/d moves by an
  ulp and a q whose x/d lies at (or an ulp from) an exact half flips by one; the fp16 d could
  move by one ulp too. Such a block decodes within one quantization step of the torch one.
  How many blocks: for full-precision f32 values (f32 sources, rotated K) x/d is almost never
  that close to a half, ~1e-5 of blocks (measured on CPU by emulating torch-CUDA's arithmetic),
  so >= 99.9% must be identical; values from f16/bf16 sources have 11/8 mantissa bits, so x/d
  hits exact halves far more often (measured ~2e-4 for f16, ~1e-3..2e-3 for bf16), so >= 99%.
  Rates are asserted on bulk data; hypothesis examples allow 1 + that fraction of blocks.
* Untouched slots (and the other layer) stay zero; what read() decodes is finite.
* write_at inside torch.cuda.graph capture writes nothing at capture and replays with new
  k, v and slot values.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from luce_core.caps import Caps
from luce_core.config import KV_DTYPES, RunConfig
from luce_core.contract.errors import ConfigError, ContextOverflowError
from luce_core.contract.types import KVSpec, ModelConfig
from luce_core.selection import explain
from luce_torch.kv import TorchKVStore
from luce_core.formats.kv_blocks import DEQUANTIZE
from gpu import GPU_REASON, needs_gpu

BLOCK = {"q8_0": 34, "q4_0": 18}
SRC_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_CAPS = dict(torch_cuda=True, nvrtc=(13, 0), nvrtc_archs=(75, 80, 86, 89, 90, 100, 120))


# ----------------------------------------------------------------------------- CPU
def _reasons(caps: Caps, config: RunConfig | None = None) -> tuple[str, ...]:
    from luce_cuda import plugin

    (c,) = explain("kv_storage", plugin.provide_kv_storage(), caps, config or RunConfig())
    return c.reasons


def test_plugin_reasons():
    h100 = Caps(**GPU_CAPS).with_overrides("cc=9.0")
    for d in KV_DTYPES:
        assert _reasons(h100, RunConfig(kv_k=d, kv_v=d)) == ()
    assert _reasons(Caps(**GPU_CAPS).with_overrides("cc=7.5")) == ()
    assert "no NVIDIA GPU" in _reasons(Caps())
    assert any("device=cpu" in r for r in _reasons(h100, RunConfig(device="cpu")))
    assert "needs SM >= 7.5 (have 7.0)" in _reasons(Caps(**GPU_CAPS).with_overrides("cc=7.0"))
    model = lambda d: ModelConfig("llama", 2, 256, 512, 4, 2, d, 100, 128)  # noqa: E731
    assert _reasons(h100, RunConfig(model=model(96))) == ()
    assert any("head_dim 16384" in r for r in _reasons(h100, RunConfig(model=model(16384))))


def test_cpu_spec_is_refused():
    from luce_cuda.kv import CudaKVStorage

    with pytest.raises(ConfigError, match="CUDA KV store") as err:
        CudaKVStorage().allocate(KVSpec(n_layers=1, n_kv_heads=1, head_dim=64, capacity=4, device="cpu"))
    assert err.value.remedy


# ----------------------------------------------------------------------------- GPU
PAIRS = [(k, v) for k in KV_DTYPES for v in KV_DTYPES]
SPECIALS = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 127.0, -63.5, 1.5, -8.0, 7.5])


def _spec(k: str, v: str, rot: bool, H: int, D: int, cap: int, device: str, L: int = 2) -> KVSpec:
    return KVSpec(n_layers=L, n_kv_heads=H, head_dim=D, capacity=cap, k_dtype=k, v_dtype=v, rotation=rot,
                  device=device, compute_dtype="f32")


def _values(gen: torch.Generator, T: int, H: int, D: int, pattern: str) -> torch.Tensor:
    """f32 [T, H, D] with per-head magnitudes; "special" mixes in ties, exact half steps and
    zero blocks; "outlier" puts a few large channels in (what the rotation is for)."""
    x = torch.randn(T, H, D, generator=gen) * (torch.rand(1, H, 1, generator=gen) * 4 + 0.05)
    if pattern == "special":
        pick = torch.randint(0, len(SPECIALS), (T, H, D), generator=gen)
        x = torch.where(torch.rand(T, H, D, generator=gen) < 0.5, SPECIALS[pick], x)
        x[0, 0, :32] = 0.0
        x[-1, -1, :32] = SPECIALS[torch.arange(32) % len(SPECIALS)]
    elif pattern == "outlier":
        x[..., torch.randint(0, D, (3,), generator=gen)] *= 40.0
    return x


def _raw(store: TorchKVStore) -> tuple[np.ndarray, np.ndarray]:
    torch.cuda.synchronize()
    return store._k_raw.cpu().numpy(), store._v_raw.cpu().numpy()


def _assert_blocks_close(got: np.ndarray, want: np.ndarray, dtype: str, min_same: float | None) -> int:
    """Same bytes, or (Q8_0 vs torch on CUDA) differing blocks decode within one quantization
    step; returns how many blocks differ. min_same: required fraction of identical blocks."""
    if dtype != "q8_0":
        np.testing.assert_array_equal(got, want)
        return 0
    g, w = got.reshape(-1, 34), want.reshape(-1, 34)
    bad = np.flatnonzero((g != w).any(axis=1))
    if bad.size:
        dg = DEQUANTIZE["q8_0"](torch.from_numpy(g[bad])).double()
        dw = DEQUANTIZE["q8_0"](torch.from_numpy(w[bad])).double()
        step = torch.maximum(torch.from_numpy(g[bad, :2].copy()).view(torch.float16).abs(),
                             torch.from_numpy(w[bad, :2].copy()).view(torch.float16).abs()).double()
        # one step of q, plus what one fp16 ulp of d moves the other 127 levels (< 1/8 step)
        assert ((dg - dw).abs() <= 1.125 * step).all(), "a Q8_0 block differs by more than one step"
    if min_same is not None:
        assert 1 - bad.size / len(g) >= min_same, f"{bad.size} of {len(g)} Q8_0 blocks differ"
    return int(bad.size)


def _min_same(src: torch.dtype, rotated: bool) -> float:
    """Fraction of Q8_0 blocks that must match the torch store on CUDA (module docstring)."""
    return 0.999 if rotated or src == torch.float32 else 0.99


def _compare(cu, ref_cpu, ref_dev, src: torch.dtype) -> None:
    s = cu.spec
    (ck, cv), (rk, rv) = _raw(cu), (ref_cpu._k_raw.numpy(), ref_cpu._v_raw.numpy())
    np.testing.assert_array_equal(ck, rk)  # byte-identical with the CPU reference (= gguf)
    np.testing.assert_array_equal(cv, rv)
    dk, dv = _raw(ref_dev)
    for got, want, dtype, rotated in ((ck, dk, s.k_dtype, cu.rotated), (cv, dv, s.v_dtype, False)):
        n = _assert_blocks_close(got, want, dtype, None)
        allowed = 1 + (got.size // 34) * (1 - _min_same(src, rotated))
        assert n <= allowed, f"{n} {dtype} blocks differ from the torch store on CUDA (allowed {allowed:.1f})"


def _assert_zero_outside(store, layer: int, slots: torch.Tensor) -> None:
    keep = torch.ones(store.spec.capacity, dtype=torch.bool)
    keep[slots.cpu()] = False
    for raw in (store._k_raw, store._v_raw):
        r = raw.cpu()
        assert not r[layer][keep].any(), "a slot that was not written changed"
        assert not r[1 - layer].any(), "the other layer changed"


@pytest.mark.parametrize("rot", [False, True], ids=["plain", "rot"])
@pytest.mark.parametrize("kd,vd", PAIRS, ids=[f"{k}-{v}" for k, v in PAIRS])
@settings(max_examples=6, deadline=None, database=None)
@given(T=st.integers(1, 24), H=st.integers(1, 4), D=st.sampled_from([64, 128, 64, 128, 96, 256]),
       src=st.sampled_from(SRC_DTYPES), pattern=st.sampled_from(["normal", "special", "outlier"]),
       strided=st.booleans(), extra=st.integers(0, 20), layer=st.integers(0, 1), seed=st.integers(0, 2**31))
@pytest.mark.gpu
@needs_gpu
def test_write_at_and_write_match_the_torch_store(kd, vd, rot, T, H, D, src, pattern, strided, extra, layer, seed):
    from luce_cuda.kv import CudaKVStorage

    gen = torch.Generator().manual_seed(seed)
    cap = T + extra
    k = _values(gen, T, H, D, pattern).to(src)
    v = _values(gen, T, H, D, pattern).to(src)
    pos = torch.randperm(cap, generator=gen)[:T]  # unique slots
    cu = CudaKVStorage().allocate(_spec(kd, vd, rot, H, D, cap, "cuda"))
    ref_cpu = TorchKVStore(_spec(kd, vd, rot, H, D, cap, "cpu"))
    ref_dev = TorchKVStore(_spec(kd, vd, rot, H, D, cap, "cuda"))
    kc, vc = k.cuda(), v.cuda()
    if strided:  # K/V as slices of a fused [T, 2H+1, D] projection: row strides != H*D
        fused = torch.zeros(T, 2 * H + 1, D, dtype=src, device="cuda")
        fused[:, 1:H + 1], fused[:, H + 1:] = kc, vc
        kc, vc = fused[:, 1:H + 1], fused[:, H + 1:]
    cu.write_at(layer, pos.cuda(), kc, vc)
    ref_cpu.write_at(layer, pos, k, v)
    ref_dev.write_at(layer, pos.cuda(), k.cuda(), v.cuda())
    _compare(cu, ref_cpu, ref_dev, src)
    _assert_zero_outside(cu, layer, pos)
    for x in cu.read(layer, cap):
        assert torch.isfinite(x).all(), "non-finite value read back"

    # write(): contiguous slots [start, start+T) of the other layer, on top of the same stores
    start = int(torch.randint(0, extra + 1, (1,), generator=gen))
    k2 = _values(gen, T, H, D, pattern).to(src)
    v2 = _values(gen, T, H, D, pattern).to(src)
    cu.write(1 - layer, start, k2.cuda(), v2.cuda())
    ref_cpu.write(1 - layer, start, k2, v2)
    ref_dev.write(1 - layer, start, k2.cuda(), v2.cuda())
    _compare(cu, ref_cpu, ref_dev, src)
    for x in cu.read(1 - layer, cap):
        assert torch.isfinite(x).all(), "non-finite value read back"


@pytest.mark.parametrize("rot", [False, True], ids=["plain", "rot"])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.gpu
@needs_gpu
def test_q8_0_bulk_identity_rate(src, rot):
    """Bulk data (32768 blocks per side): exact against the CPU store; against the torch store
    on CUDA >= 99.9% identical blocks for f32 values, >= 99% for bf16 ones (module docstring)."""
    from luce_cuda.kv import CudaKVStorage

    T, H, D = 2048, 8, 128
    gen = torch.Generator().manual_seed(7)
    k, v = (_values(gen, T, H, D, "outlier").to(src) for _ in range(2))
    stores = [CudaKVStorage().allocate(_spec("q8_0", "q8_0", rot, H, D, T, "cuda", L=1)),
              TorchKVStore(_spec("q8_0", "q8_0", rot, H, D, T, "cpu", L=1)),
              TorchKVStore(_spec("q8_0", "q8_0", rot, H, D, T, "cuda", L=1))]
    for s in stores:
        s.write(0, 0, k.to(s.k.device), v.to(s.k.device))
    cu, ref_cpu, ref_dev = stores
    (ck, cv), (dk, dv) = _raw(cu), _raw(ref_dev)
    np.testing.assert_array_equal(ck, ref_cpu._k_raw.numpy())
    np.testing.assert_array_equal(cv, ref_cpu._v_raw.numpy())
    _assert_blocks_close(ck, dk, "q8_0", _min_same(src, rot))
    _assert_blocks_close(cv, dv, "q8_0", _min_same(src, False))


@pytest.mark.gpu
@needs_gpu
def test_range_and_shape_checks():
    from luce_cuda.kv import CudaKVStorage

    cu = CudaKVStorage().allocate(_spec("q8_0", "f16", True, 2, 64, 8, "cuda"))
    k = torch.randn(3, 2, 64, device="cuda")
    with pytest.raises(ContextOverflowError):
        cu.write(0, 6, k, k)
    with pytest.raises(ContextOverflowError):
        cu.write(0, -1, k, k)
    with pytest.raises(ValueError):
        cu.write(0, 0, k, k[:, :1])
    with pytest.raises(ValueError):
        cu.write_at(0, torch.arange(2, device="cuda"), k, k)
    # slots outside [0, capacity) are skipped by the kernel, the others written
    cu.write_at(0, torch.tensor([-1, 3, 8], device="cuda"), k, k)
    torch.cuda.synchronize()
    written = cu._k_raw[0].cpu().flatten(1).any(dim=1)
    assert written.tolist() == [i == 3 for i in range(8)]
    assert not cu._k_raw[1].any() and not cu._v_raw[1].any()


@pytest.mark.parametrize("kd,vd,rot", [("q4_0", "q8_0", True), ("q8_0", "f16", True), ("bf16", "f32", False)])
@pytest.mark.gpu
@needs_gpu
def test_write_at_replays_in_a_cuda_graph(kd, vd, rot):
    from luce_cuda.kv import CudaKVStorage

    T, H, D, cap = 3, 4, 128, 32
    cu = CudaKVStorage().allocate(KVSpec(n_layers=2, n_kv_heads=H, head_dim=D, capacity=cap, k_dtype=kd,
                                         v_dtype=vd, rotation=rot, device="cuda", compute_dtype="f16"))
    ref = TorchKVStore(KVSpec(n_layers=2, n_kv_heads=H, head_dim=D, capacity=cap, k_dtype=kd, v_dtype=vd,
                              rotation=rot, device="cpu", compute_dtype="f16"))
    k_s = torch.zeros(T, H, D, dtype=torch.float16, device="cuda")
    v_s = torch.zeros_like(k_s)
    pos_s = torch.zeros(T, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cu.write_at(1, pos_s, k_s, v_s)
    torch.cuda.synchronize()
    assert not cu._k_raw.any() and not cu._v_raw.any(), "capture must not run the write"
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # new slots and values each replay, overlapping earlier ones at times
        k, v = (_values(gen, T, H, D, "outlier").half() for _ in range(2))
        pos = torch.randperm(cap, generator=gen)[:T]
        k_s.copy_(k)
        v_s.copy_(v)
        pos_s.copy_(pos)
        graph.replay()
        ref.write_at(1, pos, k, v)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(cu._k_raw.cpu().numpy(), ref._k_raw.numpy())
    np.testing.assert_array_equal(cu._v_raw.cpu().numpy(), ref._v_raw.numpy())


@pytest.mark.parametrize("kd,vd,rot", [("f16", "f16", False), ("bf16", "q8_0", False), ("q8_0", "q4_0", True),
                                       ("q4_0", "f32", True), ("f32", "bf16", False)])
@settings(max_examples=8, deadline=None, database=None)
@given(T=st.integers(1, 9), H=st.integers(1, 3), G=st.sampled_from([1, 3, 4]), D=st.sampled_from([64, 128]),
       src=st.sampled_from(SRC_DTYPES), style=st.sampled_from(["normal", "neox"]), partial=st.booleans(),
       as_tensor=st.booleans(), seed=st.integers(0, 2**31))
@pytest.mark.gpu
@needs_gpu
def test_write_rotary_is_rope_qk_then_write(kd, vd, rot, T, H, G, D, src, style, partial, as_tensor, seed):
    """RoPE fused into the append kernel: q rotated in place and the cache bytes are bit for bit
    ops.rope_qk followed by write/write_at, positions independent of the slots (a tree verify)."""
    from luce_core import rope
    from luce_cuda import ops
    from luce_cuda.kv import CudaKVStorage

    gen = torch.Generator().manual_seed(seed)
    cap = T + 16
    qkv = (torch.randn(T, (G + 2) * H, D, generator=gen) * 3).to(src).cuda()  # q, k, v as column views
    rd = D // 2 if partial else D
    inv = 10000.0 ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    cos, sin = rope.rope_tables(inv.float(), 64, torch.device("cuda"))
    positions = torch.randint(0, 64, (T,), generator=gen).cuda()
    slots = torch.randperm(cap, generator=gen)[:T].cuda() if as_tensor else int(torch.randint(0, 16, (1,), generator=gen))
    stores = [CudaKVStorage().allocate(_spec(kd, vd, rot, H, D, cap, "cuda")) for _ in range(2)]
    qs = []
    for fused, store in zip((True, False), stores):
        x = qkv.clone()
        q, k, v = x[:, :G * H], x[:, G * H:(G + 1) * H], x[:, (G + 1) * H:]
        if fused:
            assert store.write_rotary(1, slots, q, k, v, cos, sin, positions, style)
        else:
            q, k = ops.rope_qk(q, k, cos, sin, style=style, positions=positions)
            (store.write_at if as_tensor else store.write)(1, slots, k, v)
        qs.append(q.clone())
    torch.testing.assert_close(qs[0], qs[1], rtol=0, atol=0)
    for a, b in zip(_raw(stores[0]), _raw(stores[1])):
        np.testing.assert_array_equal(a, b)
    assert np.asarray(_raw(stores[0])[0]).any(), "nothing was written"
    # what the kernel cannot serve (q in another dtype) is refused untouched, for the unfused path
    other = torch.float32 if src != torch.float32 else torch.float16
    assert not stores[0].write_rotary(0, slots, qkv[:, :G * H].to(other), qkv[:, G * H:(G + 1) * H],
                                      qkv[:, (G + 1) * H:], cos, sin, positions, style)
    assert not _raw(stores[0])[0][0].any()
    from luce_cuda.kv import ROTARY_MAX_T  # prefill-sized chunks take rope_qk + append
    big = torch.zeros(ROTARY_MAX_T + 1, (G + 2) * H, D, dtype=src, device="cuda")
    assert not stores[0].write_rotary(0, 0, big[:, :G * H], big[:, G * H:(G + 1) * H], big[:, (G + 1) * H:], cos, sin,
                                      torch.zeros(ROTARY_MAX_T + 1, dtype=torch.int64, device="cuda"), style)

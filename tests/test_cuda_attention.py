"""luce_cuda attention over every KV cache format, against float64 and luce_torch references (GPU only).

The caches are luce_torch's TorchKVStore on the CUDA device: it quantizes (and Hadamard-rotates) K/V
into the bytes the kernels read, and its read() dequantizes those same bytes, so the reference sees
exactly the values the kernels decode. What remains is float32 accumulation order and the rounding
of the output to q's dtype (f16: 2^-11 relative per element; bf16: 2^-8), hence the tolerances.
Skipped cleanly without a CUDA torch and NVRTC.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch

from luce_core.formats.dtypes import TORCH_DTYPES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luce_core.contract.types import KVSpec
from gpu import GPU_REASON


FORMATS = ("f16", "bf16", "f32", "q8_0", "q4_0")
# (n_heads, n_kv_heads): GQA groups 1, 3, 4, 8
GEOMS = ((8, 8), (6, 2), (9, 3), (8, 2), (16, 4), (16, 2), (32, 4))
QDT = TORCH_DTYPES
# f32 accumulation (~1e-6) plus the output's rounding to q's dtype
DECODE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 8e-3}
# flash-prefill: FP16 operands (Q, K, V and the probabilities)
PREFILL_TOL = {torch.float16: 4e-3, torch.bfloat16: 8e-3}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite output"
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _store(kf: str, vf: str, d: int, hkv: int, cap: int, rotated: bool, n: int, seed: int):
    """A 2-layer TorchKVStore on CUDA whose layer 1 holds random K/V at [0, n) (layer 0 other data)."""
    from luce_torch.kv import TorchKVStore

    spec = KVSpec(2, hkv, d, cap, kf, vf, rotation=rotated, device="cuda", compute_dtype="f32")
    store = TorchKVStore(spec)
    g = torch.Generator(device="cuda").manual_seed(seed)
    for layer in (0, 1):
        k = torch.randn(n, hkv, d, device="cuda", generator=g)
        k[..., :: max(1, d // 8)] *= 6  # outlier channels: what rotation is for
        v = torch.randn(n, hkv, d, device="cuda", generator=g)
        store.write(layer, 0, k, v)
    return store


def oracle(q: torch.Tensor, store, layer: int, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(rot(q) k^T * scale) v in float64, query t over slots [0, pos[t]]."""
    n = int(pos.max()) + 1
    k, v = store.read(layer, n)  # the stored bytes dequantized; K in the store's (rotated) basis
    qr = store.rotate_query(q.float()).double()
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = torch.einsum("thd,nhd->thn", qr, kk) * scale
    allowed = torch.arange(n, device=q.device)[None, :] <= pos.to(q.device)[:, None]
    s = s.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.einsum("thn,nhd->thd", s.softmax(-1), vv)


def _positions(kind: str, n: int, t: int, g: torch.Generator) -> torch.Tensor:
    """T query positions whose largest is n - 1: a chain (n-T .. n-1) or scattered distinct slots."""
    if kind == "chain" or t == 1:
        return torch.arange(n - t, n, device="cuda")
    rest = torch.randperm(n - 1, generator=g)[: t - 1].sort().values
    return torch.cat([rest, torch.tensor([n - 1])]).to("cuda")


def _query(t: int, h: int, d: int, dt: torch.dtype, strided: bool, seed: int) -> torch.Tensor:
    q = torch.randn(t, h * d + 3 * d if strided else h * d, generator=torch.Generator().manual_seed(seed))
    q = q.to("cuda", dt)[:, : h * d]  # strided: a column slice of a wider (QKV-like) output
    return q.view(t, h, d)


@contextlib.contextmanager
def kernel_only():
    """A fallback to the torch reference (it warns) fails the test: the kernels must serve."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="luce_cuda attention")
        yield


# ----------------------------------------------------------------------------- CPU: index math
# numpy models of attention_decode.cu's byte handling (same index math), against luce_torch's
# block dequantization and Hadamard rotation: they pin down the layout the kernels assume.
def _funnel_rc(lo: int, hi: int, shift: int) -> int:
    return ((hi << 32 | lo) >> min(shift, 32)) & 0xFFFFFFFF


def _f16(bits: int) -> float:
    return float(np.array([bits & 0xFFFF], np.uint16).view(np.float16)[0])


def _block_dot(x: list[int], a: int, sh: int, d: float, fmt: str) -> list[float]:
    """block_dot: one block's 32 values from words x, quants at byte 4*a + sh/8."""
    out = [0.0] * 32
    for j in range(8 if fmt == "q8_0" else 4):
        xq = _funnel_rc(x[a + j], x[a + j + 1], sh)
        for k in range(4):
            if fmt == "q8_0":
                out[4 * j + k] = d * ((((xq ^ 0x80808080) >> (8 * k)) & 0xFF) - 128)
            else:
                out[4 * j + k] = d * (((xq >> (8 * k)) & 0x0F) - 8)
                out[16 + 4 * j + k] = d * (((xq >> (8 * k + 4)) & 0x0F) - 8)
    return out


def _mirror_k_row(row: bytes, fmt: str, d: int) -> np.ndarray:
    """score_row's decode of one quantized K row (list indexing fails where the kernel would read
    outside its register arrays)."""
    bb = 34 if fmt == "q8_0" else 18
    words = lambda base, n: [int.from_bytes(row[base + 4 * i: base + 4 * i + 4], "little") for i in range(n)]  # noqa: E731
    out: list[float] = []
    if len(row) % 8 == 0:  # D=128: whole row, then halves of two blocks
        assert d == 128
        w, hw = words(0, len(row) // 4), bb // 2
        for hh in range(2):
            x = w[hw * hh: hw * hh + hw] + [0]
            out += _block_dot(x, 0, 16, _f16(x[0]), fmt)
            out += _block_dot(x, (bb + 2) // 4, 0, _f16(x[bb // 4] >> 16), fmt)
    else:  # D=64: block by block from the aligned word below
        assert d == 64
        for b in range(2):
            o = b * bb
            sh = 8 * (o & 3)
            nw = 9 if fmt == "q8_0" else 5
            assert (o & ~3) + 4 * nw <= len(row), "read past the row"
            x = words(o & ~3, nw)
            out += _block_dot(x, 0, 16 + sh, _f16(x[0] >> sh), fmt)
    return np.array(out, np.float64)


def _mirror_v_row(row: bytes, fmt: str, d: int) -> np.ndarray:
    """load_v + vch over the 32 lanes of a warp: each channel written exactly once."""
    dpl, out, seen = d // 32, np.zeros(d, np.float64), np.zeros(d, int)
    u16 = lambda o: int.from_bytes(row[o:o + 2], "little")  # noqa: E731 - 2-byte aligned loads only
    for lane in range(32):
        b, k = lane // (32 // dpl), lane % (32 // dpl)
        if fmt == "q8_0":
            assert (34 * b + 2 + dpl * k) % 2 == 0
            x = u16(34 * b + 2 + dpl * k) | (u16(34 * b + 4 + dpl * k) << 16 if dpl == 4 else 0)
            vals = [((x >> (8 * e)) & 0xFF) for e in range(dpl)]
            vals = [q - 256 if q > 127 else q for q in vals]
            dd, chans = _f16(u16(34 * b)), [lane * dpl + e for e in range(dpl)]
        else:
            dd = _f16(u16(18 * b))
            if dpl == 4:
                x = u16(18 * b + 2 + 2 * k)
                vals = [(x & 15) - 8, ((x >> 8) & 15) - 8, ((x >> 4) & 15) - 8, (x >> 12) - 8]
                chans = [32 * (lane >> 3) + 2 * (lane & 7) + (e & 1) + 16 * (e >> 1) for e in range(4)]
            else:
                x = row[18 * b + 2 + k]
                vals, chans = [(x & 15) - 8, (x >> 4) - 8], [32 * (lane >> 4) + (lane & 15) + 16 * e for e in range(2)]
        for c, q in zip(chans, vals, strict=True):
            out[c] = dd * q
            seen[c] += 1
    assert (seen == 1).all()
    return out


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_block_decoding_mirror(fmt, d):
    from luce_core.formats.kv_blocks import DEQUANTIZE, QUANTIZE

    x = torch.randn(3, 2, d, generator=torch.Generator().manual_seed(d)) * 3
    raw = QUANTIZE[fmt](x)  # [3, 2, row bytes]
    ref = DEQUANTIZE[fmt](raw).double().numpy()
    rows = raw.numpy()
    for i in range(3):
        for h in range(2):
            row = rows[i, h].tobytes()
            np.testing.assert_array_equal(_mirror_k_row(row, fmt, d), ref[i, h])
            np.testing.assert_array_equal(_mirror_v_row(row, fmt, d), ref[i, h])


@pytest.mark.parametrize("d", [64, 128])
def test_kernel_fwht_mirror(d):
    """The in-kernel query rotation: signs, butterflies h < group, then 1/sqrt(group)."""
    from luce_core.formats.hadamard import Hadamard

    had = Hadamard(d)
    q = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = (q * had.signs(torch.device("cpu")).double()).numpy().copy()
    h = 1
    while h < had.group:
        for j in range(d // 2):
            i0 = ((j & ~(h - 1)) << 1) | (j & (h - 1))
            x[i0], x[i0 + h] = x[i0] + x[i0 + h], x[i0] - x[i0 + h]
        h <<= 1
    np.testing.assert_allclose(x / math.sqrt(had.group), had.rotate(q.float()).double().numpy(), rtol=1e-5, atol=1e-5)


def _random_tree(seed: int, budget: int):
    """A DDTree from random draft log-probs: branches at several depths, the chain first."""
    from luce_core.speculative.tree import build_ddtree, topk_logprobs

    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(6, 50, generator=g) * 3, dim=-1)
    top_lp, top_ids = topk_logprobs(lp, 3)
    return build_ddtree(7, top_lp, top_ids, budget)


@pytest.mark.parametrize("seed, budget, start, pad", [(0, 12, 5, 0), (1, 9, 0, 4), (2, 15, 300, 2)])
def test_tree_mask_lays_each_node_s_path_out_in_order(seed, budget, start, pad):
    """A tree's TreeMask (what the _tree kernels read): node j reads its path's slots in depth
    order and sees start + depth + 1 positions; a bool mask converts to the same table; a mask
    hiding part of the prefix from a row is refused (the kernels show every row the prefix)."""
    from luce_core.speculative.tree import TreeMask

    tree = _random_tree(seed, budget)
    tree = tree.padded(tree.size + pad)
    tm = tree.tree_mask(start)
    assert tm.table.dtype == torch.int32 and tm.table.shape == (tree.size, tree.size)
    assert tm.start.tolist() == [start]
    for j in range(tree.size):
        path = tree.path_to(j)
        assert int(tm.positions[j]) == start + tree.depths[j] == start + len(path) - 1
        assert tm.table[j, : len(path)].tolist() == [start + i for i in path]
    assert torch.equal(tm.dense(start + tree.size), tree.attention_mask(start))
    dense = TreeMask.from_dense(tree.attention_mask(start), start, "cpu")
    assert torch.equal(dense.table, tm.table) and torch.equal(dense.positions, tm.positions)
    mask = tree.attention_mask(start)
    if start:
        mask[3, start - 1] = False
        assert TreeMask.from_dense(mask, start, "cpu") is None


# ----------------------------------------------------------------------------- GPU
case_st = st.tuples(st.sampled_from(FORMATS), st.sampled_from(FORMATS), st.sampled_from([64, 128]),
                    st.sampled_from(GEOMS), st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=case_st, n=st.integers(1, 3000), t=st.sampled_from([1, 2, 9]), kind=st.sampled_from(["chain", "scatter"]),
       qdt=st.sampled_from(["f16", "f16", "bf16", "f32"]), sharp=st.sampled_from([0.5, 1.0, 3.0]),
       strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_positions_match_references(case, n, t, kind, qdt, sharp, strided, seed):
    from luce_cuda.attention import CudaAttention
    from luce_torch.attention import TorchAttention

    kf, vf, d, (h, hkv), rotated = case
    n = max(n, t)
    store = _store(kf, vf, d, hkv, n + 7, rotated, n, seed)
    pos = _positions(kind, n, t, torch.Generator().manual_seed(seed))
    q = _query(t, h, d, QDT[qdt], strided, seed)
    scale = sharp / math.sqrt(d)
    with kernel_only():
        got = CudaAttention().forward(q, store, 1, n - t, scale=scale, positions=pos)
    assert got.shape == (t, h, d) and got.dtype == q.dtype
    ref = oracle(q, store, 1, pos, scale)
    tol = DECODE_TOL[q.dtype]
    assert rel_err(got, ref) < tol, (kf, vf, d, h, hkv, rotated, n, t, kind, qdt)
    # the protocol's torch reference (window [0, start+T), query t up to positions[t]) agrees
    torch_ref = TorchAttention().forward(q.float(), store, 1, n - t, scale=scale, positions=pos)
    assert rel_err(got, torch_ref) < max(tol, 5e-4)  # SDPA's own f32 kernels


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=case_st, start=st.integers(0, 1500), t=st.sampled_from([1, 2, 9, 32, 33, 100]),
       qdt=st.sampled_from(["f16", "bf16"]), seed=st.integers(0, 2**31 - 1))
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_causal_without_positions(case, start, t, qdt, seed):
    """Causal chunks: up to DECODE_MAX_T tokens over any cache take flash-decode (start + t as each
    length); longer ones over f16/bf16 take flash-prefill, over other formats flash-prefill on an
    f16 copy."""
    from luce_cuda.attention import DECODE_MAX_T, CudaAttention

    kf, vf, d, (h, hkv), rotated = case
    store = _store(kf, vf, d, hkv, start + t + 3, rotated, start + t, seed)
    q = _query(t, h, d, QDT[qdt], False, seed)
    scale = 1 / math.sqrt(d)
    with kernel_only():
        got = CudaAttention().forward(q, store, 1, start, scale=scale)
    assert got.shape == (t, h, d) and got.dtype == q.dtype
    ref = oracle(q, store, 1, torch.arange(start, start + t, device="cuda"), scale)
    decode = t <= DECODE_MAX_T
    tol = DECODE_TOL[q.dtype] if decode else PREFILL_TOL[q.dtype]
    assert rel_err(got, ref) < tol, (kf, vf, d, h, hkv, rotated, start, t, qdt)


@pytest.mark.parametrize("kf, vf, rotated", [("f16", "f16", False), ("q4_0", "q8_0", True), ("bf16", "q4_0", False),
                                             ("q8_0", "f32", True)])
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_verify_rows_equal_single_token_decode(kf, vf, rotated):
    """A chain verify's T rows are bit for bit what T one-token decodes give (other tokens' rows
    in a block only add exact no-ops), so speculative decoding stays lossless."""
    from luce_cuda.attention import CudaAttention

    h, hkv, d, t = 12, 4, 128, 9  # G = 3: rows of several tokens share a block
    store = _store(kf, vf, d, hkv, 4096, rotated, 4096, 5)
    att = CudaAttention()
    for n in (t, 260, 777, 2049):
        pos = torch.arange(n - t, n, device="cuda")
        q = _query(t, h, d, torch.float16, True, n)
        multi = att.forward(q, store, 1, 2048 if n <= 2048 else 4096 - t, scale=0.1, positions=pos)
        for i in range(t):
            single = att.forward(q[i:i + 1], store, 1, 4095, scale=0.1, positions=pos[i:i + 1])
            assert torch.equal(multi[i], single[0]), (kf, vf, n, i)
        # the same verify run eagerly (causal, no positions) rounds identically
        assert torch.equal(att.forward(q, store, 1, n - t, scale=0.1), multi), (kf, vf, n)
        assert rel_err(multi, oracle(q, store, 1, pos, 0.1)) < DECODE_TOL[torch.float16]


@pytest.mark.parametrize("kf, vf, rotated, h, hkv, d", [("bf16", "bf16", False, 9, 3, 64),
                                                        ("f16", "q8_0", False, 32, 4, 128),
                                                        ("q8_0", "q4_0", True, 16, 1, 64),
                                                        ("q4_0", "f32", True, 6, 2, 128)])
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_tree_rows_equal_decode_after_their_path(kf, vf, rotated, h, hkv, d):
    """Tree verification (ancestor-only mask) runs the kernel, and node j's rows are bit for bit
    a one-token decode at position n + depth_j over a cache holding j's path at n.. n + depth_j:
    what plain decoding computes after accepting that path, so DDTree stays lossless. Prefix
    lengths put the tree across tile (32) and split (128) boundaries; GQA groups 3, 8, 16."""
    from luce_cuda.attention import CudaAttention

    att = CudaAttention()
    for n, seed in ((3, 0), (250, 1), (1020, 2)):
        tree = _random_tree(seed, 13).padded(16)
        t = tree.size
        store = _store(kf, vf, d, hkv, 2048, rotated, n + t, 20 + seed)
        q = _query(t, h, d, torch.bfloat16, False, seed)
        with kernel_only():
            multi = att.forward(q, store, 1, n, scale=0.1, mask=tree.tree_mask(n, "cuda"),
                                positions=tree.positions(n, "cuda"))
            # a bool mask takes the same kernels (converted once per forward)
            dense = att.forward(q, store, 1, n, scale=0.1, mask=tree.attention_mask(n, "cuda"),
                                positions=tree.positions(n, "cuda"))
        assert torch.equal(dense, multi)
        ref = att._reference().forward(q, store, 1, n, scale=0.1, mask=tree.attention_mask(n, "cuda"))
        assert rel_err(multi, ref) < DECODE_TOL[torch.bfloat16], (kf, vf, n)
        k0, v0 = store.k[1].clone(), store.v[1].clone()
        for j in range(t):
            path = tree.path_to(j)
            for i, node in enumerate(path):  # the path's raw rows, moved to consecutive slots
                store.k[1][n + i] = k0[n + node]
                store.v[1][n + i] = v0[n + node]
            last = n + len(path) - 1
            with kernel_only():
                single = att.forward(q[j:j + 1], store, 1, last, scale=0.1,
                                     positions=torch.tensor([last], device="cuda"))
            assert torch.equal(multi[j], single[0]), (kf, vf, n, j, path)
            store.k[1].copy_(k0)
            store.v[1].copy_(v0)


@pytest.mark.parametrize("t", [1, 9])
@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_graph_replays_with_new_positions(t):
    """Attention with device positions is captured once (no host sync: capture would fail) and
    replays follow new positions and queries, equal to eager calls and to the oracle."""
    from luce_cuda.attention import CudaAttention

    h, hkv, d, window = 16, 4, 128, 1024
    store = _store("q4_0", "q8_0", d, hkv, 2048, True, 2048, 11)
    att = CudaAttention()
    q_buf = torch.zeros(t, h, d, device="cuda", dtype=torch.float16)
    pos_buf = torch.arange(window - t, window, device="cuda")
    scale = 1 / math.sqrt(d)

    def step():
        return att.forward(q_buf, store, 1, window - t, scale=scale, positions=pos_buf)

    with kernel_only():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # loads the kernels and allocates the workspace before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    g = torch.Generator().manual_seed(3)
    for last in (t - 1, 255, 256, 700, window - 1):
        kind = "chain" if last % 2 else "scatter"
        pos = _positions(kind, last + 1, t, g)
        q_buf.copy_(torch.randn(t, h, d, generator=g).to("cuda", torch.float16))
        pos_buf.copy_(pos)
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        assert torch.equal(replayed, step()), last
        assert rel_err(replayed, oracle(q_buf, store, 1, pos, scale)) < DECODE_TOL[torch.float16], last


@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_flash_decode_op_checks_and_formats():
    """ops.flash_decode: uint8 caches must name their format; an int32 device length still works."""
    from luce_core.contract.errors import ConfigError
    from luce_cuda import ops

    store = _store("q8_0", "q4_0", 64, 2, 600, False, 600, 2)
    k, v = store.k[1], store.v[1]
    q = torch.randn(1, 8, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ConfigError, match="name its format"):
        ops.flash_decode(q, k, v, 10, 0.125)
    with pytest.raises(ConfigError, match="bytes"):
        ops.flash_decode(q, k, v, 10, 0.125, k_fmt="q4_0", v_fmt="q4_0")  # q8_0 rows are 68 bytes
    length = torch.tensor([517], dtype=torch.int32, device="cuda")
    got = ops.flash_decode(q, k, v, length, 0.125, k_fmt="q8_0", v_fmt="q4_0", max_len=600)
    ref = oracle(q, store, 1, torch.tensor([516], device="cuda"), 0.125)
    assert rel_err(got, ref) < DECODE_TOL[torch.float16]
    assert ops.attention_supported(64, "q8_0", "q4_0") == []
    assert ops.attention_supported(96, torch.float16) != []


@pytest.mark.gpu
@pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")
def test_a_store_without_the_dense_view_is_an_error_not_a_fallback():
    """Selection never pairs the CUDA attention with an opaque store; called with one directly,
    it says so instead of quietly running the torch reference. A dense-v1 store (even another
    object over the same memory) is read through its view."""
    from luce_core.contract.errors import ConfigError
    from luce_cuda.attention import CudaAttention

    store = _store("f16", "f16", 64, 2, 40, False, 32, 3)

    class Opaque:  # the protocol without the optional ``tensors``
        spec, length = store.spec, 32
        read, write, rotate_query = store.read, store.write, store.rotate_query

    attn = CudaAttention()
    q = torch.randn(1, 4, 64, device="cuda", dtype=torch.float16)
    with kernel_only(), pytest.raises(ConfigError, match="dense-v1"):
        attn.forward(q, Opaque(), 1, 31, scale=0.125)
    with kernel_only():
        got = attn.forward(q, store, 1, 31, scale=0.125)
    assert rel_err(got, oracle(q, store, 1, torch.tensor([31], device="cuda"), 0.125)) < DECODE_TOL[torch.float16]

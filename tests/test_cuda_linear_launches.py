"""Which GEMV launches luce_cuda.linear issues for a given row count (CPU: kernels and launches
are recorded, nothing runs). The kernels' numerics are tested on a GPU in test_cuda_kernels.py."""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("cuda.core")
from luce_cuda import linear  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    calls: list[tuple[str, tuple, int, int]] = []
    monkeypatch.setattr(linear, "get_kernel", lambda prog, name, idx: name)
    monkeypatch.setattr(linear, "device_index", lambda x: 0)
    monkeypatch.setattr(linear, "launch",
                        lambda kern, grid, block, args, like, shmem=0: calls.append((kern, grid, shmem, int(args[8]))))
    monkeypatch.setattr(linear.ops, "rms_norm", lambda x, w, eps: calls.append(("rms_norm", (1, x.shape[0]), 0, 0)) or x)
    monkeypatch.setattr(linear.QuantLinear, "_resident", classmethod(lambda cls, kern, like, smem=0: 264))
    monkeypatch.setattr(linear.ops, "rms_threads", lambda k: 256)
    monkeypatch.delenv("LUCE_GEMV_ROWPAR", raising=False)
    return calls


def _lin(qtype: str, n: int, k: int, nbytes: int) -> linear.QuantLinear:
    w = types.SimpleNamespace(qtype=qtype, n=n, k=k, planes=(torch.empty(nbytes, dtype=torch.uint8), None, None, None),
                              alpha=1.0, nbytes=nbytes)
    return linear.QuantLinear(w, "bf16")


NORM = ("rms_norm", (1, 8), 0, 0)  # a verify's 8 rows normalized by the rms_norm kernel first


def test_verify_rows_of_a_small_weight_run_side_by_side(launches, monkeypatch):
    small = _lin("Q4_1", 960, 576, 960 * 576 * 5 // 8)  # SmolLM2's QKV: 0.35 MB, 60 blocks a row
    x = torch.zeros(8, 576, dtype=torch.bfloat16)
    nw = torch.ones(576)
    small.forward(x, norm=(nw, 1e-5))
    # the norm kernel, then one launch of the one-row kernel, one grid row per x row
    assert launches == [NORM, ("gemv_q4_1_bf16", (60, 8), 0, 1)]
    launches.clear()
    small.forward(x[:1], norm=(nw, 1e-5))  # decode: the norm inside the GEMV, one grid row
    assert launches == [("gemv_q4_1_bf16_norm", (60, 1), 576 * 2, 1)]
    launches.clear()
    # 22 rows: 1 320 blocks one row a block, 360 four rows a block: 5 grid rows of 4, then 2 rows
    small.forward(torch.zeros(22, 576, dtype=torch.bfloat16))
    assert launches == [("gemv_q4_1_bf16_x8", (60, 5), 0, 4), ("gemv_q4_1_bf16_x8", (60, 1), 0, 2)]
    launches.clear()
    monkeypatch.setenv("LUCE_GEMV_ROWPAR", "1")  # forced one row a block: one launch, whatever the grid
    small.forward(torch.zeros(20, 576, dtype=torch.bfloat16))
    assert launches == [("gemv_q4_1_bf16", (60, 20), 0, 1)]
    launches.clear()
    monkeypatch.setenv("LUCE_GEMV_ROWPAR", "0")  # forced off: x8 launches one after another
    small.forward(torch.zeros(20, 576, dtype=torch.bfloat16))
    assert [(c[0], c[1], c[3]) for c in launches] == [("gemv_q4_1_bf16_x8", (60, 1), 8)] * 2 + \
        [("gemv_q4_1_bf16_x8", (60, 1), 4)]


def test_verify_rows_per_block_keep_the_grid_small(launches):
    # SmolLM2's gate|up (3072x576, 192 blocks a row): 2 rows one a block, 4 and 8 four a block
    gate_up = _lin("Q4_1", 3072, 576, 3072 * 576 * 5 // 8)
    nw = torch.ones(576)
    for m in (2, 4, 8):
        gate_up.forward(torch.zeros(m, 576, dtype=torch.bfloat16), glu=True, norm=(nw, 1e-5))
    assert [(c[0], c[1], c[3]) for c in launches] == [
        ("rms_norm", (1, 2), 0), ("gemv_q4_1_bf16", (192, 2), 1), ("rms_norm", (1, 4), 0),
        ("gemv_q4_1_bf16_x8", (192, 1), 4), ("rms_norm", (1, 8), 0), ("gemv_q4_1_bf16_x8", (192, 2), 4)]


def test_verify_rows_of_a_large_weight_keep_the_x8_kernel(launches, monkeypatch):
    big = _lin("Q4_1", 16384, 2048, 16384 * 2048 * 5 // 8)  # 21 MB: beyond L2's share
    x = torch.zeros(8, 2048, dtype=torch.bfloat16)
    big.forward(x, glu=True, norm=(torch.ones(2048), 1e-5))
    assert [(c[0], c[1][1], c[3]) for c in launches] == [("rms_norm", 8, 0), ("gemv_q4_1_bf16_x8_q8", 1, 8)]
    launches.clear()
    monkeypatch.setenv("LUCE_GEMV_ROWPAR", "1")  # forced on
    big.forward(x, glu=True, norm=(torch.ones(2048), 1e-5))
    assert [(c[0], c[1][1], c[3]) for c in launches] == [("rms_norm", 8, 0), ("gemv_q4_1_bf16_q8", 8, 1)]


def test_register_capped_formats_never_run_rows_side_by_side(launches, monkeypatch):
    # their kernels ignore the grid's y (LUCE_GEMV_ROWPAR 0 in their programs)
    monkeypatch.setenv("LUCE_GEMV_ROWPAR", "1")
    for q in ("Q4_0", "Q8_0"):
        small = _lin(q, 2048, 2048, 2048 * 2048)
        assert small.rows_per_block(8) == 0
        small.forward(torch.zeros(8, 2048, dtype=torch.bfloat16))
    assert [(c[0], c[1][1], c[3]) for c in launches] == [("gemv_q4_0_bf16_x8_q8", 1, 8), ("gemv_q8_0_bf16_x8_q8", 1, 8)]


def test_rope_store_and_f32_out_arguments_follow_each_launchs_rows(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(linear, "get_kernel", lambda prog, name, idx: name)
    monkeypatch.setattr(linear, "device_index", lambda x: 0)
    monkeypatch.setattr(linear, "launch", lambda kern, grid, block, args, like, shmem=0: calls.append((kern, args)))
    monkeypatch.setattr(linear.QuantLinear, "_resident", classmethod(lambda cls, kern, like, smem=0: 264))
    monkeypatch.setenv("LUCE_GEMV_ROWPAR", "0")
    qkv = _lin("Q8_0", 3 * 64 + 2 * 64, 256, 320 * 256)  # 3 q heads, 1 kv head of 64
    pos = torch.arange(20, dtype=torch.int64) + 5
    rs = linear.RopeStore(pos, None, 7, torch.zeros(16, 32), torch.zeros(16, 32), torch.zeros(9, 1, 64),
                          torch.zeros(9, 1, 64), 1, 1, 9, 192, 64, 64)
    qkv.forward(torch.zeros(20, 256, dtype=torch.bfloat16), rope=rs)
    assert [c[0] for c in calls] == ["gemv_q8_0_bf16_x8"] * 3
    # rows 0-7, 8-15, 16-19: positions and the start slot advance with the chunk; yf32 off
    first = 19  # the rs_* arguments follow yf32
    for c, row in zip(calls, (0, 8, 16)):
        args = c[1]
        assert int(args[first - 1]) == 0
        assert args[first].data_ptr() == pos[row:].data_ptr() and args[first + 1] is None
        assert int(args[first + 2]) == 7 + row and (int(args[first + 8]), int(args[first + 9])) == (192, 64)
    calls.clear()
    monkeypatch.setenv("LUCE_GEMV_ROWPAR", "4")  # Q4_1: 4 grid rows of 4 x rows, then rows 16-17
    qkv4 = _lin("Q4_1", 320, 256, 320 * 256 * 5 // 8)
    qkv4.forward(torch.zeros(18, 256, dtype=torch.bfloat16), rope=rs)
    assert [(c[0], int(c[1][8])) for c in calls] == [("gemv_q4_1_bf16_x8", 4), ("gemv_q4_1_bf16_x8", 2)]
    for c, row in zip(calls, (0, 16)):
        assert c[1][first].data_ptr() == pos[row:].data_ptr() and int(c[1][first + 2]) == 7 + row
    calls.clear()
    with pytest.raises(linear.ConfigError):  # a weight that is not [Q; K; V] for these widths
        _lin("Q8_0", 256, 256, 256 * 256).forward(torch.zeros(2, 256, dtype=torch.bfloat16), rope=rs)
    head = _lin("Q8_0", 300, 256, 300 * 256)
    y = head.forward(torch.zeros(1, 256, dtype=torch.bfloat16), out_f32=True)
    assert y.dtype == torch.float32 and int(calls[-1][1][first - 1]) == 1
    assert calls[-1][1][first] is None  # no RoPE-and-store

"""luce_core.formats.act_quant (the oracle of the CUDA GEMV's int8 activations) against gguf's Q8_0."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from luce_core.formats.act_quant import dequantize_act_q8, quantize_act_q8

floats = st.floats(-1e4, 1e4, width=32, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 96])), elements=floats),
       halves=st.booleans())
def test_q_bytes_equal_gguf_q8_0(x, halves):
    if halves:  # ties: with max|x| = 127 per run (d = 1) every k + 0.5 rounds away from zero
        x = (np.clip(np.round(x), -126, 125) + 0.5).astype(np.float32)
        x.reshape(-1, 32)[:, 0] = 127.0
    # a run whose scale d is subnormal has no defined rounding: 1/d overflows, and ggml then casts
    # inf or nan to int8 (undefined behaviour), which gguf's numpy port mirrors with warnings
    amax = np.abs(x.reshape(-1, 32)).max(1)
    assume(not np.any((amax > 0) & (amax / np.float32(127) < np.finfo(np.float32).tiny)))
    q, d = quantize_act_q8(torch.from_numpy(x))
    blocks = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(-1, 34)
    assert np.array_equal(blocks[:, 2:].copy().view(np.int8).reshape(x.shape), q.numpy())
    # gguf stores d as f16; ours stays f32 (max|x| / 127)
    assert np.array_equal(d.numpy().reshape(-1), (amax / np.float32(127)).astype(np.float32))


def test_dequantized_is_close_and_zero_runs_stay_zero():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    x[1, 32:64] = 0
    y = dequantize_act_q8(x)
    assert y.dtype == torch.float64 and torch.all(y[1, 32:64] == 0)
    runs = x.double().reshape(4, 8, 32)
    step = runs.abs().amax(-1, keepdim=True) / 127
    assert torch.all((y.reshape(4, 8, 32) - runs).abs() <= step / 2 * (1 + 1e-6))


def test_features_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_act_q8(torch.zeros(2, 48))


def test_just_below_half_rounds_down():
    # x + 0.5 rounds up to 1.0 in f32 for the largest float below 0.5: roundf must not
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 127.0, np.nextafter(np.float32(0.5), np.float32(0)), -2.5
    q, _ = quantize_act_q8(torch.from_numpy(x))
    assert q[0, :3].tolist() == [127, 0, -3]
    blocks = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    assert blocks[0, 2:5].view(np.int8).tolist() == [127, 0, -3]

"""luce_core.formats.quantize: byte-exact with gguf where gguf quantizes, and for the rest (Q4_K, Q6_K,
NVFP4) nearest-code rounding (no clipping for the k-quants; NVFP4 picks the least-error block
scale among the round-up one and a few below), checked through the oracle's dequantization."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from luce_core.contract.errors import ConfigError
from luce_core.formats.blocks import BLOCKS, row_bytes
from luce_core.formats.dequant import UE4M3_TABLE, dequantize, q4_k_scale_min
from luce_core.formats.quantize import quantize, quantize_nvfp4


def oracle_dequant(raw: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# magnitudes 0 or within [2^-10, 2^10]: gguf's own quantizers divide by the block scale, and a
# subnormal scale makes both sides cast inf/NaN to uint8, which is undefined. Zeros are +0 only:
# which zero numpy's min() returns among 0.0 and -0.0 depends on its SIMD reduction order (ggml
# keeps the first), so Q4_1's stored min could differ in its sign bit alone.
magnitude = st.one_of(st.just(0.0), st.floats(2.0 ** -10, 2.0 ** 10, width=32))
value = st.tuples(magnitude, st.booleans()).map(lambda t: -t[0] if t[1] and t[0] else t[0])
KINDS = ("normal", "positive", "negative", "sparse", "outliers", "constant", "grid")


@st.composite
def matrices(draw, block: int, max_blocks: int = 3) -> np.ndarray:
    """[rows, k*block] float32: a numpy-drawn body of one of several shapes of distribution
    (cheap for hypothesis at this size), with a few hypothesis-chosen values written over it."""
    rows, k = draw(st.integers(1, 4)), draw(st.integers(1, max_blocks))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(KINDS))
    x = rng.standard_normal((rows, k * block)).astype(np.float32)
    if kind == "positive":
        x = np.abs(x) + np.float32(0.5)
    elif kind == "negative":
        x = -np.abs(x) - np.float32(0.5)
    elif kind == "sparse":
        x[rng.random(x.shape) < 0.8] = 0
    elif kind == "outliers":
        x[rng.random(x.shape) < 0.02] *= 50
    elif kind == "grid":  # half-integers with block extremes that make the scale exactly 1:
        # x / scale lands on ties (k + 0.5), where rounding rules differ
        bound = draw(st.sampled_from([7.5, 8.0, 127.0]))
        x = (rng.integers(-int(2 * bound), int(2 * bound) + 1, x.shape) / 2).astype(np.float32)
        x[:, ::32], x[:, 1::32] = bound, -bound
    elif kind == "constant":
        x[:] = np.float32(draw(st.floats(-4, 4, width=32)) or 1.0)
    x *= np.float32(2.0 ** draw(st.integers(-8, 8)))
    for _ in range(draw(st.integers(0, 6))):
        x[draw(st.integers(0, rows - 1)), draw(st.integers(0, k * block - 1))] = draw(value)
    return x


# ----------------------------------------------------------------------------- byte-exact with gguf
@pytest.mark.parametrize("qtype", ("Q8_0", "Q4_0", "Q4_1", "BF16", "F16", "F32"))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_bytes_equal_gguf_quantize(qtype: str, data: st.DataObject) -> None:
    x = data.draw(matrices(32))
    # a block made of ties (equal magnitudes, both signs) exercises argmax and rounding order
    if data.draw(st.booleans()):
        tie = data.draw(st.floats(2.0 ** -10, 2.0 ** 10, width=32))
        x[0, :32] = np.float32(tie) * np.where(np.arange(32) % 3 == 0, -1, 1)
    ours = quantize(torch.from_numpy(x), qtype)
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    assert ours.dtype == np.uint8 and ours.shape == (x.shape[0], row_bytes(qtype, x.shape[1]))
    np.testing.assert_array_equal(ours, np.ascontiguousarray(ref).view(np.uint8).reshape(ours.shape))


@settings(max_examples=40, deadline=None)
@given(bits=hnp.arrays(np.uint32, st.integers(1, 64)))
def test_bf16_any_bit_pattern_matches_gguf(bits: np.ndarray) -> None:
    """NaN payloads, infinities, subnormals, rounding carries into the exponent."""
    x = bits.view(np.float32)[None]
    ours = quantize(torch.from_numpy(x.copy()), "BF16")
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint8)
    np.testing.assert_array_equal(ours, ref.reshape(ours.shape))


def test_f16_special_values() -> None:
    x = np.array([[np.inf, -np.inf, 7e4, -7e4, 6e-8, -0.0, np.nan, 1.0]], np.float32)
    ours = quantize(torch.from_numpy(x), "F16").view(np.float16)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    finite = ~np.isnan(ref)
    np.testing.assert_array_equal(ours.view(np.uint16)[finite], ref.view(np.uint16)[finite])
    assert np.isnan(ours[~finite]).all()  # NaN stays NaN (its payload is torch's canonical one)


# ----------------------------------------------------------------------------- our own quantizers
def _nearest_gap(x: np.ndarray, got: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """How much worse than the best code of ``grid`` (candidates on the last axis) each value is."""
    best = np.abs(x[..., None] - grid).min(axis=-1)
    return np.abs(x - got) - best


@settings(max_examples=30, deadline=None)
@given(x=matrices(256, 2))
def test_q4_k_nearest_code_no_clipping(x: np.ndarray) -> None:
    raw = quantize(torch.from_numpy(x), "Q4_K")
    ours = dequantize(torch.from_numpy(raw), "Q4_K", x.shape).numpy()
    assert bits_equal(ours, oracle_dequant(raw, "Q4_K"))

    b = raw.reshape(-1, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = (t.numpy().astype(np.float32) for t in q4_k_scale_min(torch.from_numpy(b[:, 4:16].copy())))
    step, offset = d * sc, dmin * mn  # per sub-block [n, 8]
    xs = x.reshape(-1, 8, 32)
    scale = np.abs(xs).max(axis=(1, 2), keepdims=True) + 1e-30
    # no clipping: every value lies within [-offset, 15*step - offset] (up to fp32 rounding)
    assert (xs.min(axis=2) >= -offset - 1e-6 * scale[:, :, 0]).all()
    assert (xs.max(axis=2) <= 15 * step - offset + 1e-6 * scale[:, :, 0]).all()
    grid = step[..., None, None] * np.arange(16, dtype=np.float32) - offset[..., None, None]
    gap = _nearest_gap(xs, ours.reshape(xs.shape), grid)
    assert (gap <= 1e-6 * scale).all()


@settings(max_examples=30, deadline=None)
@given(x=matrices(256, 2))
def test_q6_k_nearest_code_no_clipping(x: np.ndarray) -> None:
    raw = quantize(torch.from_numpy(x), "Q6_K")
    ours = dequantize(torch.from_numpy(raw), "Q6_K", x.shape).numpy()
    assert bits_equal(ours, oracle_dequant(raw, "Q6_K"))

    b = raw.reshape(-1, 210)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    step = d * b[:, 192:208].copy().view(np.int8).astype(np.float32)  # [n, 16]
    xs = x.reshape(-1, 16, 16)
    scale = np.abs(xs).max(axis=(1, 2), keepdims=True) + 1e-30
    assert (xs.min(axis=2) >= -32 * step - 1e-6 * scale[:, :, 0]).all()
    assert (xs.max(axis=2) <= 31 * step + 1e-6 * scale[:, :, 0]).all()
    grid = step[..., None, None] * np.arange(-32, 32, dtype=np.float32)
    assert (_nearest_gap(xs, ours.reshape(xs.shape), grid) <= 1e-6 * scale).all()


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def _round_up_choice(x: np.ndarray, ts: float) -> tuple[np.ndarray, np.ndarray]:
    """The plain NVFP4 choice per 16 values: the smallest UE4M3 code whose scale holds the block's
    largest |value| within 6 steps, values at their nearest E2M1. Returns (codes, squared errors)."""
    table = UE4M3_TABLE.numpy()[:0x7F]
    xs = x.reshape(-1, 16)
    need = np.abs(xs).max(axis=1) / np.float32(6) / np.float32(ts)  # float32, as the quantizer
    code = np.minimum(np.searchsorted(table, need), 0x7E)
    grid = (table[code].astype(np.float64) * ts)[:, None, None] * np.concatenate([E2M1, -E2M1])
    best = np.abs(xs.astype(np.float64)[..., None] - grid).min(axis=-1)
    return code, (best ** 2).sum(axis=1)


@settings(max_examples=30, deadline=None)
@given(x=matrices(64))
def test_nvfp4_nearest_code_and_tensor_scale(x: np.ndarray) -> None:
    raw, ts = quantize_nvfp4(torch.from_numpy(x))
    assert raw.shape == (x.shape[0], row_bytes("NVFP4", x.shape[1]))
    block_part = oracle_dequant(raw, "NVFP4")
    ours = dequantize(torch.from_numpy(raw), "NVFP4", x.shape)
    assert bits_equal(ours.numpy(), block_part)  # the oracle decodes the block-local part
    amax = np.abs(x).max()
    if amax == 0:
        assert ts == 1.0 and not block_part.any()
        return
    assert ts == float(np.float32(amax) / np.float32(6 * 448))
    codes = raw.reshape(-1, 36)[:, :4].reshape(-1)
    up, _ = _round_up_choice(x, ts)
    assert (codes <= up).all() and (codes >= np.maximum(up.astype(int) - 3, 0)).all()  # a few codes below
    step = UE4M3_TABLE.numpy()[codes] * np.float32(ts)  # per 16 values
    xs = x.reshape(-1, 16)
    got = (block_part * np.float32(ts)).reshape(xs.shape)
    grid = step[:, None, None] * np.concatenate([E2M1, -E2M1])  # +-6 steps: clipped values go there
    assert (np.abs(xs).max(axis=1) <= 7 * step * (1 + 1e-6)).all()  # clipped by at most one step
    assert (_nearest_gap(xs, got, grid) <= 1e-6 * amax).all()


@settings(max_examples=30, deadline=None)
@given(x=matrices(64))
def test_nvfp4_block_error_never_worse_than_round_up(x: np.ndarray) -> None:
    raw, ts = quantize_nvfp4(torch.from_numpy(x))
    got = oracle_dequant(raw, "NVFP4").astype(np.float64).reshape(-1, 16) * ts  # gguf decodes it
    err = ((got - x.reshape(-1, 16)) ** 2).sum(axis=1)
    _, err_up = _round_up_choice(x, ts)
    tiny = 16 * (1e-6 * float(np.abs(x).max())) ** 2
    assert (err <= err_up * (1 + 1e-5) + tiny).all()


def test_nvfp4_lower_codes_pay_off_on_normal_data() -> None:
    """On Gaussian rows the search clips some blocks and cuts the total error by > 20%."""
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)).numpy()
    raw, ts = quantize_nvfp4(torch.from_numpy(x))
    up, err_up = _round_up_choice(x, ts)
    err = ((oracle_dequant(raw, "NVFP4").reshape(-1, 16) * np.float32(ts) - x.reshape(-1, 16)) ** 2).sum(axis=1)
    codes = raw.reshape(-1, 36)[:, :4].reshape(-1)
    assert (codes < up).mean() > 0.3 and err.sum() < 0.8 * err_up.sum(), ((codes < up).mean(), err.sum() / err_up.sum())


# ----------------------------------------------------------------------------- round-trip error on N(0,1)
# measured max |error| on this exact input (64 x 512, seed 0): F16 0.00098, BF16 0.0078,
# Q8_0 0.0159, Q4_0 0.336, Q4_1 0.239, Q4_K 0.238, Q6_K 0.0665, NVFP4 0.466 (rms 0.0868;
# 0.501 / 0.101 with every block scale rounded up)
ROUND_TRIP = {  # qtype: (max |err| bound, rms bound)
    "F32": (0.0, 0.0), "F16": (0.001, 0.00025), "BF16": (0.008, 0.002),
    "Q8_0": (0.017, 0.006), "Q4_0": (0.35, 0.09), "Q4_1": (0.25, 0.082),
    "Q4_K": (0.25, 0.084), "Q6_K": (0.07, 0.02), "NVFP4": (0.48, 0.09),
}


@pytest.mark.parametrize("qtype", list(ROUND_TRIP))
def test_round_trip_error_on_normal_data(qtype: str) -> None:
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    if qtype == "NVFP4":
        raw, ts = quantize_nvfp4(x)
    else:
        raw, ts = quantize(x, qtype), 1.0
    assert raw.dtype == np.uint8 and raw.shape == (64, row_bytes(qtype, 512))
    back = oracle_dequant(raw, qtype).reshape(x.shape) * np.float32(ts)
    assert bits_equal(dequantize(torch.from_numpy(raw), qtype, tuple(x.shape)).numpy() * np.float32(ts), back)
    err = np.abs(back - x.numpy())
    max_bound, rms_bound = ROUND_TRIP[qtype]
    assert err.max() <= max_bound and np.sqrt((err ** 2).mean()) <= rms_bound, (err.max(), np.sqrt((err ** 2).mean()))


@pytest.mark.parametrize("qtype", ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"))
def test_zeros_and_leading_dims(qtype: str) -> None:
    elems = BLOCKS[qtype][0]
    z = quantize(torch.zeros(2, 3, elems), qtype)
    assert z.shape == (6, row_bytes(qtype, elems)) and not oracle_dequant(z, qtype).any()
    x = torch.randn(2, 3, elems, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(quantize(x, qtype), quantize(x.reshape(6, elems), qtype))


def test_errors_name_cause_and_remedy() -> None:
    with pytest.raises(ConfigError) as e:
        quantize(torch.zeros(1, 64), "NVFP4")
    assert "quantize_nvfp4" in e.value.remedy
    with pytest.raises(ConfigError) as e:
        quantize(torch.zeros(1, 256), "Q5_K")
    assert e.value.remedy
    with pytest.raises(ConfigError) as e:
        quantize(torch.zeros(1, 48), "Q4_K")
    assert "256" in str(e.value)
    with pytest.raises(ConfigError):
        quantize_nvfp4(torch.tensor([[float("inf")] * 64]))

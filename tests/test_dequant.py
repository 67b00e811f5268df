"""luce_core.formats.dequant against the oracle, gguf.quants.dequantize: bit for bit."""
from __future__ import annotations

import subprocess
import sys
import warnings

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from luce_core.contract.errors import ModelFileError, UnsupportedModelError
from luce_core.formats.blocks import BLOCKS
from luce_core.contract.types import QTensor
from luce_core.formats.dequant import dequantize, dequantize_qtensor, qtensor_bytes

QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "NVFP4")
FLOATS = ("F32", "F16", "BF16")
# byte offsets of the fp16 scale fields in each block (kept finite: gguf's oracle and ggml treat
# inf/NaN scales as garbage in, garbage out)
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}
# fp16 bit patterns: any finite one (an all-ones exponent loses its top bit), plus the edges
finite_f16_bits = st.one_of(
    st.sampled_from([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF]),
    st.integers(0, 0xFFFF).map(lambda b: b & ~0x4000 if b & 0x7C00 == 0x7C00 else b))


def oracle(raw: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])


def assert_bits_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    """Same shape, NaN where the oracle has NaN, and identical float32 bits everywhere else
    (stricter than ==, which would let -0.0 pass for 0.0)."""
    got = ours.cpu().numpy()
    ref = np.asarray(ref, dtype=np.float32)
    assert got.dtype == np.float32 and got.shape == ref.shape
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    bad = np.nonzero(got.view(np.uint32)[~nan] != ref.view(np.uint32)[~nan])[0]
    assert bad.size == 0, f"{bad.size} values differ, first: ours {got[~nan][bad[:4]]} vs gguf {ref[~nan][bad[:4]]}"


@st.composite
def raw_tensor(draw, qtype: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Random ggml bytes of several rows: [rows, row_bytes] and the logical shape."""
    elems, nbytes = BLOCKS[qtype]
    rows, per_row = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    n = rows * per_row
    blocks = np.frombuffer(draw(st.binary(min_size=n * nbytes, max_size=n * nbytes)), np.uint8).copy()
    blocks = blocks.reshape(n, nbytes)
    for off in F16_FIELDS.get(qtype, ()):
        bits = draw(st.lists(finite_f16_bits, min_size=n, max_size=n))
        blocks[:, off:off + 2] = np.array(bits, np.uint16).view(np.uint8).reshape(n, 2)
    if qtype == "NVFP4":
        scales = draw(st.lists(st.one_of(st.just(0x7F), st.integers(0, 255)), min_size=4 * n, max_size=4 * n))
        blocks[:, :4] = np.array(scales, np.uint8).reshape(n, 4)
        blocks.reshape(-1)[draw(st.integers(0, n - 1)) * nbytes + draw(st.integers(0, 3))] = 0x7F  # always one NaN scale
    return blocks.reshape(rows, per_row * nbytes), (rows, per_row * elems)


@pytest.mark.parametrize("qtype", QUANTS + FLOATS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_blocks_bit_exact(qtype: str, data: st.DataObject) -> None:
    raw, shape = data.draw(raw_tensor(qtype))
    ours = dequantize(torch.from_numpy(raw), qtype, shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    assert_bits_equal(ours, oracle(raw, qtype))


@pytest.mark.parametrize("qtype", QUANTS + FLOATS)
def test_flat_bytes_and_nd_shapes(qtype: str) -> None:
    elems, nbytes = BLOCKS[qtype]
    shape = (2, 3, 2 * max(elems, 32))
    rows = 6
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (rows, nbytes * shape[-1] // elems), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        blocks = raw.reshape(-1, nbytes)
        blocks[:, off:off + 2] = rng.standard_normal((blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    ref = oracle(raw, qtype).reshape(shape)
    assert_bits_equal(dequantize(torch.from_numpy(raw.reshape(-1)), qtype, shape), ref)
    assert_bits_equal(dequantize(torch.from_numpy(raw), qtype, shape), ref)


@pytest.mark.parametrize("qtype", ("F32", "F16", "Q8_0", "Q4_K", "Q6_K"))
def test_misaligned_storage_offset(qtype: str) -> None:
    """Bytes that start at an odd offset of their buffer (a tensor inside a file) still decode."""
    elems, nbytes = BLOCKS[qtype]
    n = 2 * max(elems, 32)
    size = n // elems * nbytes
    rng = np.random.default_rng(2)
    buf = rng.integers(0, 256, size + 1, dtype=np.uint8)
    raw = buf[1:].reshape(1, size)
    for off in F16_FIELDS.get(qtype, ()):
        blocks = raw.reshape(-1, nbytes)
        blocks[:, off:off + 2] = np.ones((blocks.shape[0], 1), np.float16).view(np.uint8)
    ours = dequantize(torch.from_numpy(buf)[1:], qtype, (1, n))
    assert_bits_equal(ours, oracle(np.ascontiguousarray(raw), qtype))


def test_nvfp4_nan_scale_reads_as_zero_and_codes() -> None:
    """0x7F (E4M3 NaN) is a zero scale; 0x38 is 1.0, so the codes decode to the E2M1 table."""
    block = np.zeros((1, 36), np.uint8)
    block[0, :4] = [0x38, 0x7F, 0x38, 0x01]  # 1.0, NaN->0, 1.0, smallest subnormal 2^-9
    block[0, 4:12] = [c | (c + 8) << 4 for c in range(8)]  # sub-block 0: +codes 0-7, -codes 0-7
    block[0, 12:36] = 0x77  # 6.0 everywhere else
    out = dequantize(torch.from_numpy(block), "NVFP4", (1, 64)).numpy()[0]
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    np.testing.assert_array_equal(out[:8], e2m1)
    np.testing.assert_array_equal(out[8:16], -e2m1)
    assert not np.signbit(out[8])  # code 8 is +0 in ggml's integer table
    np.testing.assert_array_equal(out[16:32], 0.0)
    np.testing.assert_array_equal(out[48:64], 6 * 2.0 ** -9)
    assert_bits_equal(torch.from_numpy(out[None]), oracle(block, "NVFP4"))


def test_errors_name_cause_and_remedy() -> None:
    raw = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(UnsupportedModelError) as e:
        dequantize(raw, "Q5_K", (32,))
    assert "Q5_K" in str(e.value) and e.value.remedy
    with pytest.raises(ModelFileError) as e:
        dequantize(raw, "Q8_0", (64,))  # two blocks' worth of shape, one block of bytes
    assert e.value.remedy
    with pytest.raises(UnsupportedModelError):
        dequantize(raw, "Q8_0", (34,))  # row is not whole blocks
    with pytest.raises(UnsupportedModelError):
        dequantize_qtensor(QTensor("w", "IQ2_XS", (32,), np.zeros((1, 34), np.uint8)))


def test_qtensor_from_readonly_memmap_no_copy(tmp_path) -> None:
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (4, 3 * 20), dtype=np.uint8)
    raw.reshape(-1, 20)[:, 0:4] = rng.standard_normal((12, 2)).astype(np.float16).view(np.uint8)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    assert not mm.flags.writeable
    w = QTensor("blk.0.w", "Q4_1", (4, 96), mm)
    assert qtensor_bytes(w).data_ptr() == mm.ctypes.data  # shares the map, no copy
    assert_bits_equal(dequantize_qtensor(w), oracle(raw, "Q4_1"))


def test_readonly_memmap_does_not_warn(tmp_path) -> None:
    """torch warns about a non-writable array once per process, so check in a fresh one."""
    np.zeros((2, 34), np.uint8).tofile(tmp_path / "w.bin")
    code = (
        "import numpy as np\n"
        "from luce_core.contract.roles import QTensor\n"
        "from luce_core.formats.dequant import dequantize_qtensor\n"
        f"mm = np.memmap({str(tmp_path / 'w.bin')!r}, dtype=np.uint8, mode='r', shape=(2, 34))\n"
        "assert not dequantize_qtensor(QTensor('w', 'Q8_0', (2, 32), mm)).any()\n")
    # -W error: torch's warning, if it escaped, would raise and exit non-zero
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "not writable" not in proc.stderr, proc.stderr


def test_qtensor_scale_multiplies() -> None:
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, (2, 36), dtype=np.uint8)
    w = QTensor("w", "NVFP4", (2, 64), raw, scale=0.0123)
    ref = oracle(raw, "NVFP4") * np.float32(0.0123)
    assert_bits_equal(dequantize_qtensor(w), ref)
    assert_bits_equal(dequantize_qtensor(QTensor("w", "NVFP4", (2, 64), raw)), oracle(raw, "NVFP4"))


@pytest.fixture
def one_thread():
    """Many small tensors: intra-op threads cost more than they give, and on a busy 2-core
    machine their barriers stall for milliseconds per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_tensor_of_smollm2_bit_exact(smollm2_path, one_thread) -> None:
    reader = gguf.GGUFReader(smollm2_path)
    seen = set()
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape))  # reader shapes are ggml ne order
        raw = t.data.view(np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reader's memmap is read-only; we only read
            ours = dequantize(torch.from_numpy(raw), qtype, shape)
        assert_bits_equal(ours, oracle(raw, qtype).reshape(shape))
        seen.add(qtype)
    assert seen == {"Q8_0", "Q4_1", "F32"} and len(reader.tensors) == 272

"""DFlash feature mirror: dtype policy, f32 reads on the mirror's device, exact memory, snapshots."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from luce_core.formats.dtypes import TORCH_DTYPES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from luce_core.config import FEATURE_DTYPES, RunConfig
from luce_core.contract.errors import ConfigError, ContextOverflowError, SnapshotError
from luce_core.feature_mirror import FeatureMirror
from luce_core.formats.blocks import feature_bytes_per_token
from luce_core.contract.types import KVSpec
from luce_torch.kv import TorchKVStorage, TorchKVStore

BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


def oracle(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """What a mirror of ``dtype`` must read back for f32 rows ``x``."""
    if dtype == "q8_0":
        return torch.from_numpy(dequantize(quantize(x.numpy(), QT.Q8_0), QT.Q8_0))
    return x.to(TORCH_DTYPES[dtype]).float()


class RecordingStorage:
    """A kv_storage role object that records what the mirror asks it to allocate."""

    def __init__(self, hide_read_range: bool = False):
        self.specs: list[KVSpec] = []
        self.hide = hide_read_range

    def allocate(self, spec: KVSpec):
        self.specs.append(spec)
        store = TorchKVStore(spec)
        if self.hide:  # a minimal KVStore: only the protocol's read()
            class Minimal:
                def __getattr__(self, name):
                    if name == "read_range":
                        raise AttributeError(name)
                    return getattr(store, name)
            return Minimal()
        return store


@settings(max_examples=30, deadline=None, database=None)
@given(dtype=st.sampled_from(FEATURE_DTYPES), width=st.sampled_from([64, 96, 576, 1152]),
       start=st.integers(0, 6), T=st.integers(1, 6), seed=st.integers(0, 2**31),
       src=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_write_read_matches_oracle(dtype, width, start, T, seed, src):
    m = FeatureMirror(TorchKVStorage(), capacity=12, width=width, dtype=dtype)
    x = (torch.randn(T, width, generator=torch.Generator().manual_seed(seed)) * 4).to(src)
    m.write(start, x)
    got = m.read(start, start + T)
    assert got.dtype == torch.float32 and got.shape == (T, width)
    assert torch.equal(got, oracle(x.float(), dtype))
    # a sub-range reads the same rows, and unwritten rows are zero
    assert torch.equal(m.read(start + T - 1, start + T), got[-1:])
    assert torch.count_nonzero(m.read(0, start)) == 0


def test_q8_0_bytes_are_ggml_q8_0_of_the_row():
    m = FeatureMirror(TorchKVStorage(), capacity=4, width=576 * 2, dtype="q8_0")
    x = torch.randn(3, 1152) * 10
    m.write(0, x)
    store = m.store
    stored = torch.cat([store.k[0, :3, 0], store.v[0, :3, 0]], dim=-1).numpy()
    np.testing.assert_array_equal(stored, quantize(x.numpy(), QT.Q8_0))


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_reads_are_f32_on_the_mirror_device(dtype, device):
    """meta tensors have no data: a host round trip anywhere in write or read would raise."""
    m = FeatureMirror(TorchKVStorage(), capacity=8, width=128, dtype=dtype, device=device)
    m.write(2, torch.ones(3, 128, device=device, dtype=torch.bfloat16))
    out = m.read(1, 5)
    assert out.device == torch.device(device) and out.dtype == torch.float32 and out.shape == (4, 128)


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_memory_is_capacity_times_width_times_bytes_per_element(dtype):
    cap, width = 100, 3 * 576  # 3 captured layers of SmolLM2's hidden size
    m = FeatureMirror(TorchKVStorage(), capacity=cap, width=width, dtype=dtype)
    want = int(cap * width * BYTES_PER_ELEMENT[dtype])
    assert m.nbytes == want == cap * m.bytes_per_token
    assert sum(t.numel() * t.element_size() for t in (m.store.k, m.store.v)) == want
    assert f"bytes={want}" in m.describe() and f"dtype={dtype}" in m.describe()


def test_memory_matches_lucebox_figures():
    # lucebox's feature ring at 25600 x 4096: F32 419 MB, F16/BF16 210 MB, Q8_0 ~111 MB
    mb = {d: 25600 * feature_bytes_per_token(4096, d) / 1e6 for d in FEATURE_DTYPES}
    assert round(mb["f32"]) == 419 and round(mb["f16"]) == round(mb["bf16"]) == 210
    assert round(mb["q8_0"]) == 111


def test_odd_block_count_pads_one_block():
    """width 96 = 3 blocks: the K half takes 2, the V half 1 plus a zero block (34 B/position)."""
    m = FeatureMirror(TorchKVStorage(), capacity=5, width=96, dtype="q8_0")
    assert m.bytes_per_token == 96 // 32 * 34 + 34 and m.nbytes == 5 * m.bytes_per_token
    x = torch.randn(5, 96)
    m.write(0, x)
    assert torch.equal(m.read(0, 5), oracle(x, "q8_0"))
    f = FeatureMirror(TorchKVStorage(), capacity=5, width=7, dtype="f16")  # odd float width
    f.write(0, x[:, :7])
    assert torch.equal(f.read(0, 5), oracle(x[:, :7], "f16")) and f.bytes_per_token == 16


def test_allocation_goes_through_the_kv_storage_role():
    rec = RecordingStorage()
    cfg = RunConfig(feature_dtype="bf16")
    FeatureMirror(rec, capacity=32, width=1152, dtype=cfg.feature_dtype, fingerprint="w1")
    (sp,) = rec.specs
    assert (sp.n_layers, sp.n_kv_heads, sp.head_dim, sp.capacity) == (1, 1, 576, 32)
    assert sp.k_dtype == sp.v_dtype == "bf16" and not sp.rotation and sp.compute_dtype == "f32"
    assert sp.fingerprint == "w1"


def test_works_with_a_store_that_only_has_read():
    m = FeatureMirror(RecordingStorage(hide_read_range=True), capacity=8, width=64, dtype="q8_0")
    x = torch.randn(6, 64)
    m.write(0, x)
    assert torch.equal(m.read(2, 6), oracle(x, "q8_0")[2:])


def test_config_errors():
    with pytest.raises(ConfigError, match="multiple of 32"):
        FeatureMirror(TorchKVStorage(), capacity=8, width=100, dtype="q8_0")
    with pytest.raises(ConfigError, match="q4_0"):
        FeatureMirror(TorchKVStorage(), capacity=8, width=128, dtype="q4_0")
    with pytest.raises(ConfigError):
        RunConfig(feature_dtype="q4_0")
    assert RunConfig().feature_dtype == "f32"
    m = FeatureMirror(TorchKVStorage(), capacity=8, width=64)
    assert m.dtype == "f32"
    with pytest.raises(ContextOverflowError):
        m.read(0, 9)
    with pytest.raises(ContextOverflowError):
        m.write(7, torch.zeros(2, 64))
    with pytest.raises(ValueError, match="64"):
        m.write(0, torch.zeros(2, 32))


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_snapshot_restore_and_disk(tmp_path, dtype):
    m = FeatureMirror(TorchKVStorage(), capacity=10, width=128, dtype=dtype, fingerprint="w1")
    x = torch.randn(6, 128)
    m.write(0, x)
    m.set_length(6)
    snap = m.snapshot()
    m.save(tmp_path / "f.kv")
    m.write(0, torch.zeros(6, 128))
    m.set_length(2)
    m.restore(snap)
    assert m.length == 6 and torch.equal(m.read(0, 6), oracle(x, dtype))
    fresh = FeatureMirror(TorchKVStorage(), capacity=10, width=128, dtype=dtype, fingerprint="w1")
    fresh.load(tmp_path / "f.kv")
    assert fresh.length == 6 and torch.equal(fresh.read(0, 6), oracle(x, dtype))
    other = "f16" if dtype != "f16" else "f32"
    with pytest.raises(SnapshotError, match="dtype"):
        FeatureMirror(TorchKVStorage(), capacity=10, width=128, dtype=other, fingerprint="w1").restore(snap)

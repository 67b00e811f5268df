"""KV snapshots: in-memory and disk round trips, the documented file layout, refusals, corruption."""
from __future__ import annotations

import itertools
import os
import struct
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luce_core.formats import kv_snapshot
from luce_core.contract.errors import SnapshotError
from luce_core.formats.kv_snapshot import KVSnapshot
from luce_core.contract.types import KVSpec
from luce_core.formats.hadamard import DEFAULT_SEED
from luce_torch.kv import TorchKVStore

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def spec(k="q8_0", v="q4_0", rotation=True, L=2, H=2, D=64, cap=16, fingerprint="model-a") -> KVSpec:
    return KVSpec(n_layers=L, n_kv_heads=H, head_dim=D, capacity=cap, k_dtype=k, v_dtype=v,
                  rotation=rotation, fingerprint=fingerprint)


def filled(sp: KVSpec, n: int, seed: int = 0) -> TorchKVStore:
    store = TorchKVStore(sp)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(sp.n_layers):
        k, v = torch.randn(2, n, sp.n_kv_heads, sp.head_dim, generator=gen)
        store.write(layer, 0, k, v)
    store.set_length(n)
    return store


def reads(store: TorchKVStore) -> list[torch.Tensor]:
    return [t for layer in range(store.spec.n_layers) for t in store.read(layer, store.length)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- in memory
def test_snapshot_is_a_host_copy_of_the_valid_prefix():
    store = filled(spec(), 10)
    snap = store.snapshot()
    assert snap.length == 10
    assert snap.k.shape == (2, 10, 2, 68) and snap.v.shape == (2, 10, 2, 36)  # q8_0 / q4_0 bytes
    assert snap.nbytes == 10 * store.bytes_per_token
    assert np.array_equal(snap.k, store.k[:, :10].numpy())
    before, k_bytes = reads(store), snap.k.copy()
    store.write(0, 0, torch.full((10, 2, 64), 7.0), torch.full((10, 2, 64), 7.0))  # later writes
    assert np.array_equal(snap.k, k_bytes)  # the snapshot did not follow the store
    assert not np.array_equal(snap.k[0], store.k[0, :10].numpy())
    store.set_length(3)
    store.restore(snap)
    assert store.length == 10 and same(reads(store), before)


@settings(max_examples=25, deadline=None, database=None)
@given(ops=st.lists(st.sampled_from(["append", "rollback", "snap", "restore"]), min_size=1, max_size=10),
       k=st.sampled_from(DTYPES), v=st.sampled_from(DTYPES))
def test_restore_returns_exactly_the_snapshotted_state(ops, k, v):
    store = TorchKVStore(spec(k, v, L=1, H=1, D=32, cap=24))
    gen = torch.Generator().manual_seed(len(ops))
    saved: tuple[KVSnapshot, list[torch.Tensor]] | None = None
    for op in ops:
        if op == "append" and store.length < 24:
            n = min(4, 24 - store.length)
            store.write(0, store.length, *torch.randn(2, n, 1, 32, generator=gen))
            store.set_length(store.length + n)
        elif op == "rollback":
            store.set_length(store.length // 2)
        elif op == "snap":
            saved = (store.snapshot(), reads(store))
        elif op == "restore" and saved is not None:
            store.restore(saved[0])
            assert store.length == saved[0].length and same(reads(store), saved[1])


def test_restore_into_a_fresh_larger_store():
    src = filled(spec(cap=16), 12)
    dst = TorchKVStore(spec(cap=64))
    dst.restore(src.snapshot())
    assert dst.length == 12 and same(reads(dst), reads(src))


def test_empty_snapshot_round_trips(tmp_path):
    store = TorchKVStore(spec())
    store.save(tmp_path / "e.kv")
    other = filled(spec(), 5)
    other.load(tmp_path / "e.kv")
    assert other.length == 0


# ----------------------------------------------------------------------------- disk
@pytest.mark.parametrize("k,v", list(itertools.product(DTYPES, DTYPES)))
def test_disk_round_trip_is_byte_exact(tmp_path, k, v):
    src = filled(spec(k, v, rotation=True, cap=8), 7, seed=hash((k, v)) % 1000)
    path = tmp_path / "kv.snap"
    src.save(path)
    dst = TorchKVStore(spec(k, v, rotation=True, cap=8))
    dst.load(path)
    assert dst.length == 7
    assert torch.equal(dst.k[:, :7].view(torch.uint8), src.k[:, :7].view(torch.uint8))
    assert torch.equal(dst.v[:, :7].view(torch.uint8), src.v[:, :7].view(torch.uint8))
    assert same(reads(dst), reads(src))
    size = 54 + len(b"model-a") + 7 * src.bytes_per_token + 32
    assert path.stat().st_size == size


def test_file_header_follows_the_documented_layout(tmp_path):
    store = filled(spec("q4_0", "bf16", rotation=True, L=3, H=2, D=64, fingerprint="fp-ü"), 5)
    path = tmp_path / "kv.snap"
    store.save(path)
    b = path.read_bytes()
    assert b[:8] == b"LUCEKV\r\n"
    assert struct.unpack_from("<I", b, 8)[0] == 1
    assert tuple(b[12:16]) == (4, 2, 1, 0)  # q4_0, bf16, rotated, reserved
    assert struct.unpack_from("<IQ", b, 16) == (64, DEFAULT_SEED)
    assert struct.unpack_from("<IIIIQH", b, 28) == (3, 2, 64, 0, 5, len("fp-ü".encode()))
    assert b[54:54 + 5].decode() == "fp-ü"
    off = 54 + 5
    nk = 3 * 5 * 2 * 36
    assert b[off:off + nk] == store.k[:, :5].numpy().tobytes()
    import hashlib
    assert b[-32:] == hashlib.sha256(b[:-32]).digest()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "kv.snap"
    filled(spec(), 3).save(path)
    old = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(kv_snapshot.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        filled(spec(), 9).save(path)
    assert path.read_bytes() == old  # the old snapshot survives a failed save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kv.snap"]  # no temporary left behind
    monkeypatch.undo()
    filled(spec(), 9).save(path)
    assert path.read_bytes() != old and sorted(p.name for p in tmp_path.iterdir()) == ["kv.snap"]


# ----------------------------------------------------------------------------- refusals
MISMATCHES = {
    "k_dtype": dict(k="q4_0"),
    "v_dtype": dict(v="q8_0"),
    "rotation": dict(rotation=False),
    "n_layers": dict(L=3),
    "n_kv_heads": dict(H=1),
    "head_dim": dict(D=32),
    "fingerprint": dict(fingerprint="model-b"),
}


@pytest.mark.parametrize("field", list(MISMATCHES))
@pytest.mark.parametrize("via_disk", [False, True])
def test_incompatible_store_is_refused_naming_the_field(tmp_path, field, via_disk):
    src = filled(spec(), 6)
    dst = TorchKVStore(spec(**MISMATCHES[field]))
    dst.set_length(2)
    with pytest.raises(SnapshotError, match=rf"\b{field}\b") as e:
        if via_disk:
            src.save(tmp_path / "s.kv")
            dst.load(tmp_path / "s.kv")
        else:
            dst.restore(src.snapshot())
    assert e.value.remedy and dst.length == 2  # refused before touching the store


def test_length_beyond_capacity_is_refused():
    src = filled(spec(cap=16), 12)
    with pytest.raises(SnapshotError, match="capacity is 8"):
        TorchKVStore(spec(cap=8)).restore(src.snapshot())
    TorchKVStore(spec(cap=12)).restore(src.snapshot())  # exactly full fits


def test_spec_fingerprint_is_what_counts():
    src = filled(spec(fingerprint="weights-1"), 4)  # the plan puts the model's fingerprint in the spec
    with pytest.raises(SnapshotError, match="fingerprint"):
        TorchKVStore(spec(fingerprint="")).restore(src.snapshot())
    TorchKVStore(spec(fingerprint="weights-1")).restore(src.snapshot())


def test_rotation_flag_is_irrelevant_for_float_k():
    # float K is never rotated, so a snapshot taken with the flag on fits a store with it off
    src = filled(spec("f16", "q8_0", rotation=True), 5)
    dst = TorchKVStore(spec("f16", "q8_0", rotation=False))
    dst.restore(src.snapshot())
    assert same(reads(dst), reads(src))


def test_restore_rejects_foreign_objects():
    store = TorchKVStore(spec())
    with pytest.raises(SnapshotError, match="tuple"):
        store.restore((3, None, None))
    snap = filled(spec(), 4).snapshot()
    with pytest.raises(SnapshotError, match="payload"):
        attrs.evolve(snap, k=snap.k[:, :3])


# ----------------------------------------------------------------------------- corruption
@pytest.fixture(scope="module")
def snapshot_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("snap") / "good.kv"
    filled(spec(L=1, H=1, cap=8), 6).save(path)
    return path


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_truncation_is_detected(snapshot_file, tmp_path, data):
    good = snapshot_file.read_bytes()
    cut = data.draw(st.integers(0, len(good) - 1))
    bad = tmp_path / "cut.kv"
    bad.write_bytes(good[:cut])
    with pytest.raises(SnapshotError):
        kv_snapshot.load(bad)


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_is_detected(snapshot_file, tmp_path, data):
    good = bytearray(snapshot_file.read_bytes())
    pos = data.draw(st.integers(0, len(good) - 1))
    good[pos] ^= data.draw(st.integers(1, 255))
    bad = tmp_path / "flip.kv"
    bad.write_bytes(bytes(good))
    with pytest.raises(SnapshotError):
        TorchKVStore(spec(L=1, H=1, cap=8)).load(bad)


@pytest.mark.parametrize("case,match", [
    ("missing", "cannot open"), ("empty", "empty"), ("garbage", "not a luce KV snapshot"),
    ("trailing", "trailing"), ("payload", "checksum"), ("version", "layout version 2"),
])
def test_corrupt_files_name_the_problem(snapshot_file, tmp_path, case, match):
    good = snapshot_file.read_bytes()
    bad = tmp_path / "bad.kv"
    content = {
        "empty": b"", "garbage": os.urandom(200).replace(b"L", b"x"), "trailing": good + b"\0",
        "payload": good[:100] + bytes([good[100] ^ 1]) + good[101:],
        "version": good[:8] + struct.pack("<I", 2) + good[12:],
    }.get(case)
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(SnapshotError, match=match) as e:
        kv_snapshot.load(bad)
    assert e.value.remedy

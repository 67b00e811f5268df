"""Spec of the ``kv_storage`` role, for every KV dtype pair an implementation accepts: round-trip
error within the dtype's bound, write/read/set_length/snapshot/restore invariants, and memory
accounting (bytes_per_token and nbytes)."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from luce_core.plugin_api import KV_DTYPES, KVSpec, RunConfig
from luce_specs.hyp import spec_settings
from luce_specs.oracles import KV_BYTES_PER_VALUE, kv_error_bound

LUCE_ROLE = "kv_storage"
QUANTIZED = ("q8_0", "q4_0")


def _variants() -> dict[str, RunConfig]:
    out = {d: RunConfig(kv_k=d, kv_v=d, kv_rotation=False) for d in KV_DTYPES}
    out.update({f"{d}-rot": RunConfig(kv_k=d, kv_v=d, kv_rotation=True) for d in QUANTIZED})
    out["q8_0+q4_0-rot"] = RunConfig(kv_k="q8_0", kv_v="q4_0", kv_rotation=True)
    out["bf16+f16"] = RunConfig(kv_k="bf16", kv_v="f16")
    return out


LUCE_VARIANTS = _variants()
SETTINGS = spec_settings(15)
N_LAYERS = 2

geometry = st.tuples(st.integers(1, 3), st.sampled_from([64, 128]))  # (n_kv_heads, head_dim)


def _spec(subject, n_kv: int, head_dim: int, capacity: int) -> KVSpec:
    c = subject.config
    return KVSpec(n_layers=N_LAYERS, n_kv_heads=n_kv, head_dim=head_dim, capacity=capacity,
                  k_dtype=c.kv_k, v_dtype=c.kv_v, rotation=c.kv_rotation and c.kv_k in QUANTIZED,
                  device=subject.device, compute_dtype="f32")


def _kv(gen: torch.Generator, t: int, n_kv: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # per-head magnitudes differ, as real K/V do: a block scale shared across heads would show
    scale = torch.rand(1, n_kv, 1, generator=gen) * 4 + 0.05
    k = torch.randn(t, n_kv, head_dim, generator=gen) * scale
    v = torch.randn(t, n_kv, head_dim, generator=gen) * scale
    return k.to(device), v.to(device)


def _reads(store, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(x.clone() for x in store.read(layer, end)) for layer in range(N_LAYERS)]


def _assert_same(a: list, b: list) -> None:
    for (ka, va), (kb, vb) in zip(a, b):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def _assert_within(dtype: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.detach().cpu().double() - want.detach().cpu().double()).abs()
    bound = kv_error_bound(dtype, want.detach().cpu())
    worst = float((err - bound).max()) if err.numel() else 0.0
    assert worst <= 0, f"{dtype}: error exceeds its bound by {worst:.3g}"


@SETTINGS
@given(geo=geometry, start=st.integers(0, 20), t=st.integers(1, 10), layer=st.integers(0, N_LAYERS - 1),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_within_dtype_bound(subject, geo, start: int, t: int, layer: int, seed: int) -> None:
    n_kv, hd = geo
    gen = torch.Generator().manual_seed(seed)
    store = subject.create().allocate(_spec(subject, n_kv, hd, start + t + 2))
    assert store.length == 0
    k, v = _kv(gen, t, n_kv, hd, subject.device)
    store.write(layer, start, k, v)
    rk, rv = store.read(layer, start + t)
    assert rk.shape == rv.shape == (start + t, n_kv, hd)
    assert rk.dtype == rv.dtype == torch.float32
    assert rk.device.type == subject.device
    # K comes back in the store's basis; rotate_query maps any vector into it (identity unrotated)
    _assert_within(subject.config.kv_k, rk[start:], store.rotate_query(k))
    _assert_within(subject.config.kv_v, rv[start:], v)
    # attention scores survive the rotation: q . k == R q . R k
    q = torch.randn(3, n_kv, hd, generator=gen).to(subject.device)
    torch.testing.assert_close(torch.einsum("qhd,thd->qth", store.rotate_query(q), store.rotate_query(k)),
                               torch.einsum("qhd,thd->qth", q, k), atol=1e-3, rtol=1e-4)


@SETTINGS
@given(geo=geometry, n=st.integers(1, 16), span=st.tuples(st.integers(0, 20), st.integers(1, 10)),
       seed=st.integers(0, 2**31 - 1))
def test_restore_gives_back_the_snapshot(subject, geo, n: int, span: tuple[int, int], seed: int) -> None:
    n_kv, hd = geo
    gen = torch.Generator().manual_seed(seed)
    capacity = 32
    store = subject.create().allocate(_spec(subject, n_kv, hd, capacity))
    for layer in range(N_LAYERS):
        store.write(layer, 0, *_kv(gen, n, n_kv, hd, subject.device))
    store.set_length(n)
    before = _reads(store, n)
    snap = store.snapshot()
    for _ in range(2):  # a snapshot can be restored more than once
        a, t = span
        t = min(t, capacity - a)
        for layer in range(N_LAYERS):  # overwrite inside and beyond the snapshot
            store.write(layer, a, *_kv(gen, t, n_kv, hd, subject.device))
        store.set_length(a + t)
        store.restore(snap)
        assert store.length == n
        _assert_same(_reads(store, n), before)


@SETTINGS
@given(geo=geometry, n=st.integers(2, 16), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_truncate_then_rewrite(subject, geo, n: int, data, seed: int) -> None:
    n_kv, hd = geo
    gen = torch.Generator().manual_seed(seed)
    store = subject.create().allocate(_spec(subject, n_kv, hd, 24))
    for layer in range(N_LAYERS):
        store.write(layer, 0, *_kv(gen, n, n_kv, hd, subject.device))
    store.set_length(n)
    before = _reads(store, n)
    keep = data.draw(st.integers(0, n - 1))
    store.set_length(keep)  # roll back rejected draft tokens
    assert store.length == keep
    m = data.draw(st.integers(keep + 1, 24))
    k, v = _kv(gen, m - keep, n_kv, hd, subject.device)
    store.write(0, keep, k, v)  # only layer 0 is rewritten: layer 1 must not change
    store.set_length(m)
    assert store.length == m
    rk, rv = store.read(0, m)
    assert torch.equal(rk[:keep], before[0][0][:keep]) and torch.equal(rv[:keep], before[0][1][:keep])
    _assert_within(subject.config.kv_k, rk[keep:], store.rotate_query(k))
    _assert_within(subject.config.kv_v, rv[keep:], v)
    k1, v1 = store.read(1, n)
    assert torch.equal(k1, before[1][0]) and torch.equal(v1, before[1][1])


@spec_settings(8)
@given(geo=geometry, capacity=st.integers(1, 64), extra=st.integers(1, 64))
def test_memory_accounting(subject, geo, capacity: int, extra: int) -> None:
    n_kv, hd = geo
    storage = subject.create()
    small = storage.allocate(_spec(subject, n_kv, hd, capacity))
    large = storage.allocate(_spec(subject, n_kv, hd, capacity + extra))
    bpt = small.bytes_per_token
    assert large.bytes_per_token == bpt
    ideal = N_LAYERS * n_kv * hd * (KV_BYTES_PER_VALUE[subject.config.kv_k] + KV_BYTES_PER_VALUE[subject.config.kv_v])
    assert ideal <= bpt <= 1.25 * ideal, f"bytes_per_token {bpt} vs {ideal} for the dtypes (padding up to 25 %)"
    # fixed overhead (rotation matrices, ...) is allowed; per-position memory is bytes_per_token
    assert large.nbytes - small.nbytes == bpt * extra
    assert small.nbytes >= bpt * capacity

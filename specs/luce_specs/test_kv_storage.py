"""Spec of the ``kv_storage`` role, for every KV dtype pair an implementation accepts: round-trip
error within the dtype's bound, write/read/set_length/snapshot/restore invariants, memory
accounting (bytes_per_token and nbytes), and each optional member the store has (write_at,
move, read_range, write_rotary, the layout view ``tensors``) against what the contract says."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from luce_core.plugin_api import DENSE_V1, KV_DTYPES, KVSpec, RunConfig, optional
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


# ----------------------------------------------------------------------------- optional members
# Each is tested where the store has it (``optional`` gives None otherwise): a member that is
# present must do what luce_core.contract.roles.KVStore says, since the core then relies on it.

def _member(store, name: str):
    member = optional(store, "kv_store", name)
    if member is None:
        pytest.skip(f"the store has no {name} (optional)")
    return member


def _filled(subject, gen: torch.Generator, n_kv: int, hd: int, capacity: int, n: int):
    store = subject.create().allocate(_spec(subject, n_kv, hd, capacity))
    for layer in range(N_LAYERS):
        store.write(layer, 0, *_kv(gen, n, n_kv, hd, subject.device))
    store.set_length(n)
    return store


@spec_settings(8)
@given(geo=geometry, start=st.integers(0, 12), t=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_write_at_equals_write(subject, geo, start: int, t: int, seed: int) -> None:
    n_kv, hd = geo
    gen = torch.Generator().manual_seed(seed)
    a = subject.create().allocate(_spec(subject, n_kv, hd, start + t + 1))
    b = subject.create().allocate(_spec(subject, n_kv, hd, start + t + 1))
    write_at = _member(b, "write_at")
    k, v = _kv(gen, t, n_kv, hd, subject.device)
    a.write(1, start, k, v)
    write_at(1, torch.arange(start, start + t, device=subject.device), k, v)
    _assert_same(_reads(a, start + t), _reads(b, start + t))


@spec_settings(8)
@given(geo=geometry, n=st.integers(2, 12), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_move_copies_rows(subject, geo, n: int, data, seed: int) -> None:
    n_kv, hd = geo
    store = _filled(subject, torch.Generator().manual_seed(seed), n_kv, hd, 2 * n + 1, n)
    move = _member(store, "move")
    src = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n))
    dst = data.draw(st.integers(0, n))
    before = _reads(store, n)
    move(torch.tensor(src, dtype=torch.int64), dst)
    after = _reads(store, dst + len(src))
    for (k0, v0), (k1, v1) in zip(before, after):  # exact: the stored bytes are copied
        assert torch.equal(k1[dst:], k0[src]) and torch.equal(v1[dst:], v0[src])
        assert torch.equal(k1[:dst], k0[:dst]) and torch.equal(v1[:dst], v0[:dst])


@spec_settings(8)
@given(geo=geometry, n=st.integers(1, 12), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_read_range_equals_read_tail(subject, geo, n: int, data, seed: int) -> None:
    n_kv, hd = geo
    store = _filled(subject, torch.Generator().manual_seed(seed), n_kv, hd, n + 1, n)
    read_range = _member(store, "read_range")
    end = data.draw(st.integers(0, n))
    start = data.draw(st.integers(0, end))
    for layer in range(N_LAYERS):
        k, v = store.read(layer, end)
        rk, rv = read_range(layer, start, end)
        assert torch.equal(rk, k[start:]) and torch.equal(rv, v[start:])


def _decoded(t: torch.Tensor, fmt: str) -> torch.Tensor:
    from luce_core.formats.kv_blocks import DEQUANTIZE

    return (DEQUANTIZE[fmt](t) if fmt in QUANTIZED else t).to(torch.float32)


@spec_settings(8)
@given(geo=geometry, n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_layout_view_holds_what_read_returns(subject, geo, n: int, seed: int) -> None:
    """A store whose descriptor names a layout hands it out as ``tensors`` (dense-v1: the
    module docstring of luce_core.contract.kv_layout), holding exactly what read() returns."""
    n_kv, hd = geo
    gen = torch.Generator().manual_seed(seed)
    store = _filled(subject, gen, n_kv, hd, n + 2, n)
    view = optional(store, "kv_store", "tensors")
    layout = subject.impl.kv_layout
    if not layout:
        assert view is None, "a store whose descriptor names no kv_layout must not hand out tensors"
        pytest.skip("opaque store: no layout to check")
    assert layout == DENSE_V1, f"layout {layout!r} has no spec here"
    assert view is not None and view.layout == layout
    c = subject.config
    assert (view.k_format, view.v_format) == (c.kv_k, c.kv_v)
    assert view.k.shape[:3] == view.v.shape[:3] == (N_LAYERS, n + 2, n_kv)
    for layer in range(N_LAYERS):
        k, v = store.read(layer, n)
        assert torch.equal(_decoded(view.k[layer, :n], view.k_format).to(k.device), k.float())
        assert torch.equal(_decoded(view.v[layer, :n], view.v_format).to(v.device), v.float())
    # the rotation the view names is the one rotate_query applies
    q = torch.randn(3, n_kv, hd, generator=gen).to(subject.device)
    if view.rotated:
        from luce_core.formats.hadamard import fwht

        g = view.rotation_group
        assert view.signs is not None and tuple(view.signs.shape) == (hd,) and hd % g == 0
        want = fwht((q * view.signs.to(q.device)).reshape(3, n_kv, hd // g, g)).reshape(3, n_kv, hd)
        torch.testing.assert_close(store.rotate_query(q), want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(store.rotate_query(q), q)


@spec_settings(8)
@given(geo=geometry, start=st.integers(0, 12), t=st.integers(1, 8), tensor_slots=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_write_rotary_is_rope_then_write(subject, geo, start: int, t: int, tensor_slots: bool, seed: int) -> None:
    """Where write_rotary serves a call, q comes back rotated (in place) and the store holds the
    rotated k and v, as the reference RoPE followed by write would leave them."""
    from luce_core.plugin_api import TORCH_LAYER_OPS, rope_tables

    n_kv, hd = geo
    gen = torch.Generator().manual_seed(seed)
    store = subject.create().allocate(_spec(subject, n_kv, hd, start + t + 1))
    write_rotary = _member(store, "write_rotary")
    dev = subject.device
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    cos, sin = rope_tables(inv, start + t + 1, dev)
    q = torch.randn(t, 2 * n_kv, hd, generator=gen).to(dev)
    k, v = _kv(gen, t, n_kv, hd, dev)
    pos = torch.arange(start, start + t, device=dev)
    want_q, want_k = TORCH_LAYER_OPS.rope_qk(q.clone(), k.clone(), cos, sin, pos, "normal")
    slots = pos if tensor_slots else start
    got_q = q.clone()
    if not write_rotary(1, slots, got_q, k.clone(), v, cos, sin, pos, "normal"):
        pytest.skip("write_rotary declined this call (allowed)")
    torch.testing.assert_close(got_q, want_q, atol=1e-4, rtol=1e-4)
    rk, rv = store.read(1, start + t)
    # within the dtype's rounding of the reference, plus RoPE arithmetic in another order
    err = (rk[start:].cpu().double() - store.rotate_query(want_k).cpu().double()).abs()
    assert float((err - kv_error_bound(subject.config.kv_k, store.rotate_query(want_k).cpu()) - 1e-4).max()) <= 0
    _assert_within(subject.config.kv_v, rv[start:], v)

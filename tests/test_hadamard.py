"""Walsh-Hadamard rotation: oracle matrix, orthogonality, fixed signs, outlier spreading."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from luce_core.formats.hadamard import DEFAULT_SEED, Hadamard, _splitmix64, fwht, group_size, sign_vector

SETTINGS = settings(max_examples=30, deadline=None, database=None)


def sylvester(n: int) -> np.ndarray:
    """Oracle: the Sylvester Hadamard matrix scaled to be orthonormal, built by Kronecker products."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / math.sqrt(n)


@pytest.mark.parametrize("dim,max_group,want", [
    (64, 128, 64), (128, 128, 128), (256, 128, 128), (256, 256, 256), (96, 128, 32),
    (80, 128, 16), (192, 128, 64), (7, 128, 1), (512, 200, 128),
])
def test_group_size_is_largest_power_of_two_dividing_dim(dim, max_group, want):
    assert group_size(dim, max_group) == want


def test_splitmix64_matches_reference_sequence():
    # The reference splitmix64 seeded with 0 first outputs 0xE220A8397B1DCDAF, then 0x6E789E6AA1B965F4.
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    assert _splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_sign_vector_is_fixed_and_seeded():
    s = sign_vector(256)
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert 80 < (s < 0).sum() < 176  # roughly balanced
    assert np.array_equal(s, sign_vector(256, DEFAULT_SEED))
    assert np.array_equal(sign_vector(64), s[:64])  # element i depends only on (seed, i)
    assert not np.array_equal(sign_vector(256, DEFAULT_SEED + 1000), s)


@SETTINGS
@given(log_n=st.integers(0, 8), rows=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_fwht_equals_normalized_sylvester_matrix(log_n, rows, seed):
    n = 1 << log_n
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want = x.numpy() @ sylvester(n).T
    np.testing.assert_allclose(fwht(x).numpy(), want, rtol=1e-12, atol=1e-12)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(3, 48))


@SETTINGS
@given(dim=st.sampled_from([32, 64, 96, 128, 256]), seed=st.integers(0, 2**31))
def test_rotate_equals_blockdiag_hadamard_times_signs(dim, seed):
    h = Hadamard(dim)
    g = h.group
    blocks = np.kron(np.eye(dim // g), sylvester(g))
    matrix = blocks @ np.diag(sign_vector(dim).astype(np.float64))
    x = torch.randn(4, 3, dim, generator=torch.Generator().manual_seed(seed))
    np.testing.assert_allclose(h.rotate(x).numpy(), x.double().numpy() @ matrix.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h.unrotate(x).numpy(), x.double().numpy() @ matrix, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(dim=st.sampled_from([32, 64, 96, 128, 256]), seed=st.integers(0, 2**31),
       scale=st.floats(1e-3, 1e3))
def test_rotation_is_orthogonal(dim, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    h = Hadamard(dim)
    q = torch.randn(7, dim, generator=gen) * scale
    k = torch.randn(7, dim, generator=gen) * scale
    rq, rk = h.rotate(q), h.rotate(k)
    dots = (q.double() * k.double()).sum(-1)
    tol = 1e-5 * scale * scale * math.sqrt(dim)
    torch.testing.assert_close((rq.double() * rk.double()).sum(-1), dots, rtol=1e-5, atol=tol)
    torch.testing.assert_close(h.unrotate(rk), k, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(h.rotate(h.unrotate(k)), k, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=0)


def test_rotation_keeps_dtype_and_shape():
    h = Hadamard(64)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3, 9, 64).to(dt)
        y = h.rotate(x)
        assert y.dtype == dt and y.shape == x.shape
    with pytest.raises(ValueError, match="rotation size"):
        h.rotate(torch.zeros(2, 32))


def test_rotation_spreads_a_spike_over_its_group():
    h = Hadamard(256)  # two groups of 128
    x = torch.zeros(256)
    x[5] = 10.0
    y = h.rotate(x)
    # all of the spike's energy lands evenly on the first group, none on the second
    torch.testing.assert_close(y[:128].abs(), torch.full((128,), 10.0 / math.sqrt(128)))
    assert torch.count_nonzero(y[128:]) == 0

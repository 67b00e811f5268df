"""Randomized Walsh-Hadamard rotation along the last dimension (fast butterfly, n log n).

``rotate(x) = H_g · diag(s) · x`` applied independently to each ``g``-element group of the last
dimension, with ``H_g`` the Sylvester Hadamard matrix scaled by ``1/sqrt(g)`` (orthonormal and
symmetric, so ``H_g · H_g = I``) and ``s`` a fixed ±1 vector over the whole dimension. The map is
orthogonal, so ``rotate(q) · rotate(k) == q · k`` and ``unrotate(x) = diag(s) · H_g · x``.

Why: K vectors after RoPE carry a few outlier channels; a block quantizer scales every block by
its largest element, so one outlier wastes the 4 or 8 bits of the other 31 elements. The rotation
spreads each outlier's energy over the whole group before quantization. The random signs make
that hold for any input (a plain Hadamard maps some structured inputs to spikes).

The signs come from splitmix64 over ``seed + i`` (bit 63 of each output): a tiny integer
recipe that gives the same table on every machine and library version, which matters because a
snapshot stores rotated K and is only valid under the identical transform.
"""
from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_SEED = 0x6C756365  # "luce"
DEFAULT_MAX_GROUP = 128
_MASK = (1 << 64) - 1


def group_size(dim: int, max_group: int = DEFAULT_MAX_GROUP) -> int:
    """Largest power of two that divides ``dim`` and is at most ``max_group``."""
    if dim <= 0:
        raise ValueError(f"dimension must be positive, got {dim}")
    return min(dim & -dim, 1 << (max_group.bit_length() - 1))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sign_vector(n: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """The fixed ±1 diagonal: float32 [n]."""
    return np.array([-1.0 if _splitmix64((seed + i) & _MASK) >> 63 else 1.0 for i in range(n)], dtype=np.float32)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform of the last dimension (a power of two), in x's dtype."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"FWHT length must be a power of two, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        # butterflies (a, b) -> (a + b, a - b) between elements h apart
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x * (1.0 / math.sqrt(n))


class Hadamard:
    """The rotation for vectors of ``dim`` elements; tensors may be on any device."""

    def __init__(self, dim: int, seed: int = DEFAULT_SEED, max_group: int = DEFAULT_MAX_GROUP):
        self.dim = dim
        self.seed = seed
        self.group = group_size(dim, max_group)
        self._signs_np = sign_vector(dim, seed)
        self._signs: dict[torch.device, torch.Tensor] = {}

    def signs(self, device: torch.device) -> torch.Tensor:
        s = self._signs.get(device)
        if s is None:
            s = self._signs[device] = torch.from_numpy(self._signs_np).to(device)
        return s

    def _grouped_fwht(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = fwht(x.reshape(*lead, self.dim // self.group, self.group))
        return y.reshape(*lead, self.dim)

    def _check(self, x: torch.Tensor) -> torch.dtype:
        if x.shape[-1] != self.dim:
            raise ValueError(f"last dimension {x.shape[-1]} != rotation size {self.dim}")
        return x.dtype

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``H · diag(s) · x`` along the last dim; computed in f32, returned in x's dtype."""
        dt = self._check(x)
        y = x.to(torch.float32) * self.signs(x.device)
        return self._grouped_fwht(y).to(dt)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse (and transpose): ``diag(s) · H · x``."""
        dt = self._check(x)
        y = self._grouped_fwht(x.to(torch.float32))
        return (y * self.signs(x.device)).to(dt)

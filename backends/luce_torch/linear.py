"""Reference ``linear`` role: dequantize each weight once per (device, dtype), then matmul.

Simple and exact rather than fast: it holds the whole weight in the compute dtype, so it is the
oracle the quantized kernels are compared against, and the fallback on any torch device. It
declares no ``exact_rows``: CPU BLAS libraries round a row differently with the row count (MKL
f32: GEMV for one row, GEMM for more) and even with the weight's address (``luce_core.row_exact``),
so speculative decoding verifies row by row on it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from luce_core.plugin_api import Caps, ConfigError, QTensor, RunConfig
from luce_core.formats.dequant import dequantize_qtensor

_Key = tuple[int, str, str, torch.dtype]


class TorchLinear:
    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        # value holds the QTensor too, so its id() cannot be reused by another object while cached
        self._cache: dict[_Key, tuple[QTensor, torch.Tensor]] = {}

    def dequantize(self, w: QTensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight as ``dtype`` of ``w.shape`` on ``device``; cached, so tied weights
        (embedding and output head) share one copy."""
        device = torch.device(device)
        key = (id(w), w.name, str(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            # F32 on the CPU comes back as a view of the (read-only) memory map: copy it, so the
            # cached weight is owned and an in-place op on it cannot fault or edit the file
            hit = (w, dequantize_qtensor(w, device).to(dtype, copy=w.qtype == "F32"))
            self._cache[key] = hit
        return hit[1]

    def prepare(self, w: QTensor, device: torch.device | str,
                dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        if len(w.shape) != 2:
            raise ConfigError(f"linear weight {w.name!r} has shape {w.shape}; a matrix (out, in) is needed",
                              remedy="use dequantize() for vectors and other non-matrix tensors")
        weight = self.dequantize(w, device, dtype)

        def apply(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x.to(dtype), weight)

        return apply

    def clear(self) -> None:
        """Drop every cached weight (e.g. after the model is unloaded)."""
        self._cache.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in self._cache.values())

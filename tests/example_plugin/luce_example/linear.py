"""The implementation itself, imported only when selected: float32 weights, float32 matmul."""
from __future__ import annotations

from typing import Callable

import torch

from luce_core.plugin_api import Caps, QTensor, RunConfig


class ExampleLinear:
    """Follows ``luce_core.contract.roles.Linear``; built by luce as ``ExampleLinear(caps, config)``."""

    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        self.caps, self.config = caps, config

    def dequantize(self, w: QTensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        from luce_core.formats.dequant import dequantize_qtensor  # luce's reference dequantizer

        return dequantize_qtensor(w, device).to(dtype)

    def prepare(self, w: QTensor, device: torch.device,
                dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        weight_t = self.dequantize(w, device, torch.float32).T.contiguous()  # once per weight

        def forward(x: torch.Tensor) -> torch.Tensor:
            return (x.to(torch.float32) @ weight_t).to(dtype)

        return forward

"""ggml's scalar conventions, shared by the weight and the KV-cache quantizers."""
from __future__ import annotations

import torch


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as ggml's roundf (torch.round is half-to-even, and
    floor(a + 0.5) would round 0.49999997 up)."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float32 [..., k] -> its fp16 values' bytes, uint8 [..., 2k] (little-endian, as ggml stores them)."""
    return t.to(torch.float16).contiguous().view(torch.uint8)

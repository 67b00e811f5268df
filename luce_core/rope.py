"""Rotary position embeddings: tables and application (both GGUF conventions)."""
from __future__ import annotations

import torch

from luce_core.contract.errors import UnsupportedModelError
from luce_core.contract.types import ModelConfig


def inv_frequencies(cfg: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair angular frequencies (float64 for accurate tables)."""
    dim = cfg.rope_dim or cfg.head_dim
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if freq_factors is not None:  # llama3-style scaling ships per-pair divisors as rope_freqs.weight
        inv = inv / freq_factors.to(torch.float64)
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_scaling not in ("none", "llama3"):
        raise UnsupportedModelError(f"RoPE scaling {cfg.rope_scaling!r} is not supported",
                                    remedy="supported: none, linear, llama3 (rope_freqs)")
    return inv


def rope_tables(inv: torch.Tensor, positions: int | torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin in float32 of positions 0 .. n-1 ([n, dim/2], ``positions`` an int n), or of the
    positions in a tensor [...] ([..., dim/2]). Angles are float64 either way, so a row is the
    same whether it comes from the table or from its position."""
    pos = torch.arange(positions) if isinstance(positions, int) else positions
    ang = pos.to(torch.float64)[..., None] * inv.to(pos.device, torch.float64)
    return torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x [..., T, H, D] by per-token cos/sin [..., T, dim/2]; dims beyond 2*dim/2 pass through.

    "normal" rotates adjacent pairs (2i, 2i+1): the GGUF llama layout, whose converter permuted
    the Q/K rows for it. "neox" rotates (i, i + dim/2): qwen2/qwen3 and HF's rotate_half.
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half].float(), x[..., 2 * half:]
    c, s = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    if style == "normal":
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    out = out.to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

"""B sequences decoded in lockstep through the model's own forward (``Transformer.forward_batch``).

The batch's rows are flattened into the token axis, so the per-layer code (norms, projections,
RoPE, residuals: the model's ``LayerOps``) runs unchanged; only the K/V cache and attention here
know about sequences. Every sequence decodes the same cache column each step: prompts are
left-padded, and the pad columns are masked out of attention (a pad query sees only itself, so no
row is ever fully masked and no NaN can reach the real rows through a zero-weighted value).
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from luce_core.contract.types import ModelConfig

# Not cuDNN: its attention builds an execution plan per new shape, and decoding grows the key
# length every step (measured on an H200: 2.7 ms of host time per call, 65 % of the run).
_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@attrs.define(eq=False)
class LockstepKV:
    """Plain K/V tensors [B, kv_heads, length, head_dim] per layer; the ``write`` of a
    ``KVStore`` (what ``LayerOps.rope_store`` calls) for rows flattened from [B, T]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype: torch.dtype,
              device: torch.device) -> "LockstepKV":
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)])

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B*T, kv_heads, head_dim] (sequence-major) into columns start .. start+T-1."""
        B = self.batch
        T = k.shape[0] // B
        self.k[layer][:, :, start:start + T] = k.reshape(B, T, *k.shape[1:]).transpose(1, 2)
        self.v[layer][:, :, start:start + T] = v.reshape(B, T, *v.shape[1:]).transpose(1, 2)


class LockstepAttention:
    """The ``Attention.forward`` of one lockstep forward: queries [B*T, H, D] at columns
    start .. start+T-1 over a ``LockstepKV``. ``key_ok`` [B, start+T] marks each sequence's
    real columns; the mask, with the GQA group folded into the query axis, is built once here
    for every layer."""

    def __init__(self, cfg: ModelConfig, key_ok: torch.Tensor, start: int, T: int):
        B, end = key_ok.shape
        self.group = group = cfg.n_heads // cfg.n_kv_heads
        cols = torch.arange(end, device=key_ok.device)
        qcol = cols[start:start + T]
        allowed = (cols[None, :] <= qcol[:, None])[None] & key_ok[:, None, :]  # [B, T, end]
        allowed = allowed | (cols[None, None, :] == qcol[None, :, None])  # a pad query sees itself
        self.mask = allowed[:, None, None].expand(B, 1, group, T, end).reshape(B, 1, group * T, end)

    def forward(self, q: torch.Tensor, kv: LockstepKV, layer: int, start: int, *, scale: float,
                mask: None = None, positions: None = None) -> torch.Tensor:
        B, g = kv.batch, self.group
        N, H, D = q.shape
        T, KV = N // B, H // g
        end = start + T
        qh = q.reshape(B, T, KV, g, D).permute(0, 2, 3, 1, 4).reshape(B, KV, g * T, D)
        kh = kv.k[layer][:, :, :end].to(q.dtype)
        vh = kv.v[layer][:, :, :end].to(q.dtype)
        with sdpa_kernel(_SDPA_BACKENDS):
            a = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=self.mask, scale=scale)
        return a.view(B, KV, g, T, D).permute(0, 3, 1, 2, 4).reshape(N, H, D)

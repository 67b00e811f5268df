"""Reference causal GQA attention over a KV store."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from luce_core.plugin_api import Caps, KVStore, RunConfig, TreeMask


class TorchAttention:
    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        pass

    def forward(self, q: torch.Tensor, kv: KVStore, layer: int, start: int, *,
                scale: float, mask: torch.Tensor | TreeMask | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        T, n_heads, _ = q.shape
        end = start + T
        if isinstance(mask, TreeMask):
            mask = mask.dense(end)
        if mask is None and positions is not None:
            mask = torch.arange(end, device=q.device)[None, :] <= positions.to(q.device)[:, None]
        k, v = kv.read(layer, end)
        q = kv.rotate_query(q)
        group = n_heads // k.shape[1]
        # [H, T, D] layout; GQA by repeating kv heads (SDPA's enable_gqa is not on every build)
        qh = q.transpose(0, 1)
        kh = k.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
        vh = v.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
        if mask is None:
            if T == 1:
                out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
            else:
                pos_q = torch.arange(start, end, device=q.device)[:, None]
                allowed = torch.arange(end, device=q.device)[None, :] <= pos_q
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.to(q.device), scale=scale)
        return out.transpose(0, 1)

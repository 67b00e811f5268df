"""The DFlash drafter's inference forward: the math of ``DFlashModel.context_kv`` and
``denoise`` (one block) in a few dozen launches instead of ~270.

Training needs autograd and many blocks per context, so ``DFlashModel`` keeps one plain-torch
formulation of it. Drafting runs one block at a time with frozen weights, and there launches
are the cost (a 135M target's whole decode step is ~550 µs on an H200). Here:

* weights are concatenated once: Q|K|V and gate|up per layer, and the context K|V projections
  of *all* layers (so a committed row's K/V for every layer is one matmul);
* RMSNorm, RoPE (q and k together, in place) and SwiGLU go through the target's ``LayerOps``
  (luce_cuda: one kernel each; on CPU the torch reference);
* residual adds ride in the projection (``addmm``); the MASK rows' input projection is computed
  once; the GQA group is folded into the query axis instead of repeating K/V;
* the target's head runs as in its own forward (``norm_linear``: RMSNorm + LM head, f32 out).

The results equal ``DFlashModel``'s up to rounding order (tests/test_dflash.py compares them).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from luce_core.plugin_api import rope_tables


class FastDrafter:
    """Frozen, fused weights of a ``DFlashModel`` for drafting with the target's layer ops."""

    def __init__(self, model: Any, ops: Any, positions: int):
        c = model.cfg
        self.cfg, self.ops = c, ops
        w = lambda lin: lin.weight.detach()  # noqa: E731
        f32 = lambda p: p.detach().float()  # noqa: E731  (the norm kernels read f32 weights)
        self.layers = [dict(attn_norm=f32(L.attn_norm), ffn_norm=f32(L.ffn_norm),
                            qkv=torch.cat([w(L.q), w(L.k), w(L.v)]), o_t=w(L.o).t(),
                            gate_up=torch.cat([w(L.gate), w(L.up)]), down_t=w(L.down).t())
                       for L in model.layers]
        # context K of every layer first, then every V: the K half is one [T, layers*kvh, hd] view
        self.ctx_kv = torch.cat([w(L.k) for L in model.layers] + [w(L.v) for L in model.layers])
        self.fc, self.fc_norm = w(model.fc), f32(model.fc_norm)
        self.in_proj = w(model.in_proj)
        with torch.no_grad():
            self.mask_row = model.in_proj(model.mask_emb.to(self.in_proj.dtype)[None])[0]
        self.norm, self.out_proj = f32(model.norm), w(model.out_proj)
        self.cos, self.sin = rope_tables(model.inv_freq.double().cpu(), positions, self.fc.device)

    def context_rows(self, feats: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (roped at ``pos`` [T]) and V [layers, T, kvh, hd] of committed rows with target
        features ``feats`` [T, feature_width]."""
        c, ops = self.cfg, self.ops
        T, nl = feats.shape[0], c.n_layers
        ctx = ops.rms_norm(feats.to(self.fc.dtype) @ self.fc.t(), self.fc_norm, c.rms_eps)
        kv = (ctx @ self.ctx_kv.t()).view(T, 2, nl * c.n_kv_heads, c.head_dim)
        k, _ = ops.rope_qk(kv[:, 0], kv[:, 0, :0], self.cos, self.sin, pos, "neox")  # only K rotates: empty "k"
        k = k.view(T, nl, c.n_kv_heads, c.head_dim).transpose(0, 1)
        return k, kv[:, 1].view(T, nl, c.n_kv_heads, c.head_dim).transpose(0, 1)

    def block_hidden(self, first: torch.Tensor, pos: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                     ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [block, target_hidden] of the block [first, MASK...] at positions ``pos``
        [block], attending to context K/V [layers, S, kvh, hd] (``ctx_mask`` [S] True = visible)
        and to the whole block."""
        c, ops = self.cfg, self.ops
        B, H, KV, hd = c.block, c.n_heads, c.n_kv_heads, c.head_dim
        g = H // KV
        x = torch.cat([first.to(self.in_proj.dtype) @ self.in_proj.t(), self.mask_row.expand(B - 1, -1)])
        mask = None
        if ctx_mask is not None:
            mask = torch.cat([ctx_mask, ctx_mask.new_ones(B)])[None, None, None]
        for i, L in enumerate(self.layers):
            qkv = ops.rms_norm(x, L["attn_norm"], c.rms_eps) @ L["qkv"].t()
            q = qkv[:, : H * hd].view(B, H, hd)
            k = qkv[:, H * hd:(H + KV) * hd].view(B, KV, hd)
            q, k = ops.rope_qk(q, k, self.cos, self.sin, pos, "neox")
            v = qkv[:, (H + KV) * hd:].view(B, KV, hd)
            kk = torch.cat([ctx_k[i].to(k.dtype), k]).transpose(0, 1)  # [KV, S+B, hd]
            vv = torch.cat([ctx_v[i].to(v.dtype), v]).transpose(0, 1)
            qf = q.reshape(B, KV, g, hd).permute(1, 2, 0, 3).reshape(1, KV, g * B, hd)
            a = F.scaled_dot_product_attention(qf, kk[None], vv[None], attn_mask=mask, scale=hd ** -0.5)
            a = a.view(KV, g, B, hd).permute(2, 0, 1, 3).reshape(B, H * hd)
            x = torch.addmm(x, a, L["o_t"])
            gu = ops.rms_norm(x, L["ffn_norm"], c.rms_eps) @ L["gate_up"].t()
            x = torch.addmm(x, ops.swiglu(gu[:, : c.ffn], gu[:, c.ffn:]), L["down_t"])
        return ops.rms_norm(x, self.norm, c.rms_eps) @ self.out_proj.t()

"""``DFlashModel``: the drafter's trainable formulation (many blocks per context, autograd).
RMSNorm and RoPE are the core's, so training rounds as drafting does (``runtime.FusedForward``)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from luce_core.plugin_api import ModelConfig, ModelFileError, apply_rope, rms_norm, rope_tables
from luce_drafters.dflash.config import DFlashConfig, default_capture


def inv_frequencies(cfg: DFlashConfig) -> torch.Tensor:
    """The drafter's RoPE frequencies (float64, on the CPU; rotate-half over the whole head)."""
    return 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))


class _Layer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        w, hd = cfg.width, cfg.head_dim
        self.attn_norm = nn.Parameter(torch.ones(w))
        self.q = nn.Linear(w, cfg.n_heads * hd, bias=False)
        self.k = nn.Linear(w, cfg.n_kv_heads * hd, bias=False)
        self.v = nn.Linear(w, cfg.n_kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.n_heads * hd, w, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(w))
        self.gate = nn.Linear(w, cfg.ffn, bias=False)
        self.up = nn.Linear(w, cfg.ffn, bias=False)
        self.down = nn.Linear(cfg.ffn, w, bias=False)


class DFlashModel(nn.Module):
    """The drafter's own weights. The target's embedding and head are passed in, not owned."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.feature_width, cfg.width, bias=False)
        self.fc_norm = nn.Parameter(torch.ones(cfg.width))
        self.in_proj = nn.Linear(cfg.target_hidden, cfg.width, bias=False)
        self.mask_emb = nn.Parameter(torch.zeros(cfg.target_hidden))
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.ones(cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.target_hidden, bias=False)
        # not a buffer: Module.to(dtype) would round it to the weights' dtype
        self._inv = inv_frequencies(cfg)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
        with torch.no_grad():
            self.mask_emb.copy_(torch.randn(self.mask_emb.shape, generator=g) * 0.02)

    def _rotations(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., T, D/2] at positions pos [..., T]: computed once, used by every layer."""
        if self._inv.device != pos.device:
            self._inv = self._inv.to(pos.device)  # once per device, not per call
        return rope_tables(self._inv, pos, pos.device)

    # -------------------------------------------------------------- pieces shared by train/infer
    def context(self, feats: torch.Tensor) -> torch.Tensor:
        """Target features [..., S, feature_width] -> drafter context rows [..., S, width]."""
        return rms_norm(self.fc(feats.to(self.fc.weight.dtype)), self.fc_norm, self.cfg.rms_eps)

    def context_kv(self, ctx: torch.Tensor, pos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K [..., S, kvh, hd] roped at ``pos`` [..., S], V) of context rows."""
        c = self.cfg
        cos, sin = self._rotations(pos)
        out = []
        for layer in self.layers:
            k = layer.k(ctx).unflatten(-1, (c.n_kv_heads, c.head_dim))
            v = layer.v(ctx).unflatten(-1, (c.n_kv_heads, c.head_dim))
            out.append((apply_rope(k, cos, sin, "neox"), v))
        return out

    def denoise(self, first: torch.Tensor, pos0: torch.Tensor, ctx_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [A, block, target_hidden] of the block [first, MASK...] at positions
        pos0 [A] .. pos0+block-1, attending to context K/V ([A, S, kvh, hd] per layer; ctx_mask
        [A, S] True = visible) and to the whole block (non-causal)."""
        return self.denoise_blocks(first[:, None], pos0[:, None], ctx_kv,
                                   None if ctx_mask is None else ctx_mask[:, None])[:, 0]

    def denoise_blocks(self, first: torch.Tensor, pos0: torch.Tensor,
                       ctx_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """K blocks per row sharing one context: hidden states [A, K, block, target_hidden] of the
        blocks [first[a, k], MASK...] at positions pos0 [A, K] .. +block-1. Every block attends to
        the context rows its ctx_mask [A, K, S] allows (None: all) and to its own rows
        (non-causal), never to another block. Inference drafts one block (K = 1); training packs
        many anchors of a sequence over that sequence's context, computed once."""
        c = self.cfg
        A, K, B = first.shape[0], first.shape[1], c.block
        dt = self.in_proj.weight.dtype
        x = torch.cat([first[:, :, None, :].to(dt), self.mask_emb.to(dt).expand(A, K, B - 1, -1)], dim=2)
        x = self.in_proj(x).flatten(1, 2)  # [A, K*B, width]
        pos = (pos0[:, :, None] + torch.arange(B, device=x.device)).flatten(1)
        group = c.n_heads // c.n_kv_heads
        mask = None
        if ctx_mask is not None or K > 1:
            S = ctx_kv[0][0].shape[1]
            cm = (ctx_mask if ctx_mask is not None
                  else torch.ones((A, K, S), dtype=torch.bool, device=x.device))
            ctx_part = cm[:, :, None, :].expand(A, K, B, S).reshape(A, K * B, S)
            own = torch.eye(K, dtype=torch.bool, device=x.device)
            own = own[:, None, :, None].expand(K, B, K, B).reshape(K * B, K * B)
            mask = torch.cat([ctx_part, own.expand(A, -1, -1)], dim=-1)[:, None]  # [A, 1, K*B, S+K*B]
        cos, sin = self._rotations(pos)
        for layer, (ck, cv) in zip(self.layers, ctx_kv):
            h = rms_norm(x, layer.attn_norm, c.rms_eps)
            q = apply_rope(layer.q(h).unflatten(-1, (c.n_heads, c.head_dim)), cos, sin, "neox")
            k = apply_rope(layer.k(h).unflatten(-1, (c.n_kv_heads, c.head_dim)), cos, sin, "neox")
            v = layer.v(h).unflatten(-1, (c.n_kv_heads, c.head_dim))
            kk = torch.cat([ck.to(k.dtype), k], dim=1).transpose(1, 2).repeat_interleave(group, dim=1)
            vv = torch.cat([cv.to(v.dtype), v], dim=1).transpose(1, 2).repeat_interleave(group, dim=1)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask,
                                               scale=c.head_dim ** -0.5)
            x = x + layer.o(a.transpose(1, 2).flatten(-2))
            h = rms_norm(x, layer.ffn_norm, c.rms_eps)
            x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h))
        return self.out_proj(rms_norm(x, self.norm, c.rms_eps)).unflatten(1, (K, B))


def build_model(cfg: DFlashConfig, state: dict[str, torch.Tensor]) -> DFlashModel:
    """A ``DFlashModel`` (f32) holding a loaded state dict (``files.load_drafter``)."""
    m = DFlashModel(cfg)
    missing, unexpected = m.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ModelFileError(f"DFlash drafter weights do not match its config: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}", remedy="the file is corrupt; retrain it")
    return m


def untrained(target: ModelConfig, *, block: int, seed: int = 0, window: int = 64,
              capture: tuple[int, ...] | None = None) -> tuple[DFlashConfig, DFlashModel]:
    """A small drafter with random weights sized for ``target``: enough for protocol checks
    (the drafter role's conformance spec, tests), useless for drafting."""
    cfg = DFlashConfig(target_hidden=target.hidden, target_vocab=target.vocab, target_layers=target.n_layers,
                       capture=capture or default_capture(target.n_layers), width=32, n_layers=1, n_heads=2,
                       n_kv_heads=1, head_dim=16, ffn=64, block=block, window=window)
    m = DFlashModel(cfg)
    m.reset_parameters(seed)
    return cfg, m


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(cfg: DFlashConfig) -> str:
    m = DFlashModel(cfg)
    return (f"DFlash drafter: {cfg.n_layers} layers, width {cfg.width}, {cfg.n_heads}/{cfg.n_kv_heads} heads x "
            f"{cfg.head_dim}, ffn {cfg.ffn}, block {cfg.block}, window {cfg.window}, capture {list(cfg.capture)}, "
            f"{parameter_count(m) / 1e6:.2f} M parameters")

"""The llama-family transformer (llama, qwen2, qwen3) written against the roles.

The graph knows no kernel: matmuls go through the selected ``linear``, attention through the
selected ``attention``, K/V through a ``kv_storage`` store. Tensor names are GGUF's.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import attrs
import torch

from luce_core import rope
from luce_core.errors import ModelFileError
from luce_core.roles import Attention, KVStore, Linear, LoadedModel, ModelConfig, QTensor

Proj = Callable[[torch.Tensor], torch.Tensor]


@attrs.define
class Block:
    attn_norm: torch.Tensor
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    ffn_norm: torch.Tensor
    gate: Proj
    up: Proj
    down: Proj
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


@attrs.frozen
class ForwardOut:
    logits: torch.Tensor  # [T, vocab] float32 (only the rows asked for)
    features: torch.Tensor | None = None  # [T, len(capture) * hidden]: hidden states for drafters


class Transformer:
    def __init__(self, loaded: LoadedModel, linear: Linear, attention: Attention,
                 device: torch.device, dtype: torch.dtype, max_positions: int,
                 progress: Callable[[Iterable], Iterable] = lambda it: it):
        self.cfg = cfg = loaded.config
        self.device, self.dtype, self.attention = device, dtype, attention
        t = loaded.tensors

        def get(name: str) -> QTensor:
            if name not in t:
                raise ModelFileError(f"{loaded.path}: tensor {name!r} is missing")
            return t[name]

        def vec(name: str) -> torch.Tensor:
            return linear.dequantize(get(name), device, torch.float32)

        def opt_vec(name: str) -> torch.Tensor | None:
            return vec(name) if name in t else None

        self.embed = linear.dequantize(get("token_embd.weight"), device, dtype)
        self.blocks: list[Block] = []
        for i in progress(range(cfg.n_layers)):
            p = f"blk.{i}."
            mat = lambda n: linear.prepare(get(p + n + ".weight"), device, dtype)  # noqa: E731
            self.blocks.append(Block(
                attn_norm=vec(p + "attn_norm.weight"), q=mat("attn_q"), k=mat("attn_k"), v=mat("attn_v"),
                o=mat("attn_output"), ffn_norm=vec(p + "ffn_norm.weight"), gate=mat("ffn_gate"),
                up=mat("ffn_up"), down=mat("ffn_down"),
                q_bias=opt_vec(p + "attn_q.bias"), k_bias=opt_vec(p + "attn_k.bias"), v_bias=opt_vec(p + "attn_v.bias"),
                q_norm=opt_vec(p + "attn_q_norm.weight"), k_norm=opt_vec(p + "attn_k_norm.weight")))
        self.out_norm = vec("output_norm.weight")
        self.lm_head = linear.prepare(t.get("output.weight") or get("token_embd.weight"), device, dtype)
        factors = vec("rope_freqs.weight") if "rope_freqs.weight" in t else None
        self.cos, self.sin = rope.rope_tables(rope.inv_frequencies(cfg, None if factors is None else factors.cpu()), max_positions, device)
        self.scale = cfg.head_dim ** -0.5

    @property
    def config(self) -> ModelConfig:
        return self.cfg

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, kv: KVStore, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                logits_rows: slice | torch.Tensor | None = None,
                capture: Sequence[int] = ()) -> ForwardOut:
        """Run ``tokens`` [T] occupying KV slots [start, start+T).

        positions (default start..start+T-1) drive RoPE, so tree verification can give siblings
        the same depth; mask (bool [T, start+T]) replaces the causal mask. logits_rows limits the
        LM head to some rows (prefill needs only the last). capture lists layer indices whose
        input hidden states (and, for index n_layers, the final pre-norm output) are returned.
        """
        T = tokens.shape[0]
        pos = torch.arange(start, start + T, device=self.device) if positions is None else positions.to(self.device)
        return self._run(tokens.to(self.device), pos, kv, lambda i, k, v: kv.write(i, start, k, v),
                         start, mask, logits_rows, capture)

    @torch.inference_mode()
    def decode_static(self, tokens: torch.Tensor, pos: torch.Tensor, kv: KVStore, window: int) -> torch.Tensor:
        """Decode (or chain-verify) T consecutive tokens with static shapes, for CUDA-graph capture.

        tokens and pos are device tensors [T] (no host sync reads them); each token's K/V goes to
        slot pos[i] via ``kv.write_at`` and attention spans the fixed ``window`` slots, a query
        seeing the slots up to its own position. Returns logits [T, vocab].
        """
        mask = torch.arange(window, device=self.device)[None, :] <= pos[:, None]
        return self._run(tokens, pos, kv, lambda i, k, v: kv.write_at(i, pos, k, v),
                         window - tokens.shape[0], mask, None, ()).logits

    def _run(self, tokens: torch.Tensor, pos: torch.Tensor, kv: KVStore,
             write: Callable[[int, torch.Tensor, torch.Tensor], None], attn_start: int,
             mask: torch.Tensor | None, logits_rows: slice | torch.Tensor | None,
             capture: Sequence[int]) -> ForwardOut:
        cfg = self.cfg
        T = tokens.shape[0]
        cos, sin = self.cos[pos], self.sin[pos]
        x = self.embed_tokens(tokens)
        feats: list[torch.Tensor] = []
        for i, b in enumerate(self.blocks):
            if i in capture:
                feats.append(x)
            h = rms_norm(x, b.attn_norm, cfg.rms_eps)
            q, k, v = b.q(h), b.k(h), b.v(h)
            if b.q_bias is not None:
                q, k, v = q + b.q_bias.to(q.dtype), k + b.k_bias.to(k.dtype), v + b.v_bias.to(v.dtype)
            q = q.view(T, cfg.n_heads, cfg.head_dim)
            k = k.view(T, cfg.n_kv_heads, cfg.head_dim)
            v = v.view(T, cfg.n_kv_heads, cfg.head_dim)
            if b.q_norm is not None:
                q, k = rms_norm(q, b.q_norm, cfg.rms_eps), rms_norm(k, b.k_norm, cfg.rms_eps)
            q = rope.apply_rope(q, cos, sin, cfg.rope_style)
            k = rope.apply_rope(k, cos, sin, cfg.rope_style)
            write(i, k, v)
            a = self.attention.forward(q, kv, i, attn_start, scale=self.scale, mask=mask)
            x = x + b.o(a.reshape(T, cfg.n_heads * cfg.head_dim).to(x.dtype))
            h = rms_norm(x, b.ffn_norm, cfg.rms_eps)
            x = x + b.down(torch.nn.functional.silu(b.gate(h)) * b.up(h))
        if cfg.n_layers in capture:
            feats.append(x)
        rows = x if logits_rows is None else x[logits_rows]
        logits = self.lm_head(rms_norm(rows, self.out_norm, cfg.rms_eps)).float()
        return ForwardOut(logits, torch.cat(feats, dim=-1) if feats else None)

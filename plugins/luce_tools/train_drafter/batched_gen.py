"""Batched greedy generation with the target's own weights, for drafter training data.

luce's Session and KV stores hold one sequence; generating hundreds of thousands of tokens one
sequence at a time spends minutes in per-token launches. :class:`BatchedGreedy` runs the same
``Transformer`` (its prepared projections, norms, embedding, RoPE tables and LM head: no weight
is copied or re-derived) over ``B`` sequences at once with a plain float K/V tensor per layer.

Prompts are left-padded to a common length so that every row decodes the same column each
step; a row's RoPE positions start at 0 at its first real token and the pad columns are masked
out of attention (a pad query sees only itself, so no row is ever fully masked and no NaN can
reach the real rows through a zero-weighted value). Captured hidden states (the drafter's
target features) are kept for every fed position: the prefill's rows and each decode step's row,
the same values a later forward over the finished sequence would capture.
"""
from __future__ import annotations

from typing import Callable, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from luce_core import rope
from luce_core.plugin_api import ConfigError, Transformer, rms_norm

# Not cuDNN: its attention builds an execution plan per new shape, and decoding grows the key
# length every step (measured on an H200: 2.7 ms of host time per call, 65 % of the run).
_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@attrs.frozen(eq=False)
class Batch:
    """One generated batch, right-aligned (row i's tokens start at column 0).

    tokens [B, L] long (prompt + generation, stop token included when one ended the row; 0 past
    the end), feats [B, L, F] (the capture rows of every fed position; the last token of a row
    was never fed, so its row is zero), lens [B], prompt_lens [B] (long, on the device)."""

    tokens: torch.Tensor
    feats: torch.Tensor | None
    lens: torch.Tensor
    prompt_lens: torch.Tensor


class BatchedGreedy:
    """Greedy (T=0) decoding of many sequences at once over a luce ``Transformer``.

    kv_dtype: dtype of the K/V tensors (default: the model's compute dtype); pass the session's
    KV dtype (f16 by default) to round K/V as luce's own store does.
    """

    def __init__(self, model: Transformer, kv_dtype: torch.dtype | None = None):
        self.m = model
        self.cfg = model.cfg
        self.kv_dtype = kv_dtype or model.dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    # ------------------------------------------------------------------ one forward
    def _forward(self, tokens: torch.Tensor, start: int, pos: torch.Tensor, key_ok: torch.Tensor,
                 capture: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, T] at columns start..start+T-1 (RoPE positions pos [B, T]); key_ok [B, start+T]
        marks real columns. Returns last-row logits [B, vocab] (f32) and features [B, T, F]."""
        m, cfg = self.m, self.cfg
        B, T = tokens.shape
        end = start + T
        group = cfg.n_heads // cfg.n_kv_heads
        cols = torch.arange(end, device=tokens.device)
        qcol = cols[start:end]
        allowed = (cols[None, :] <= qcol[:, None])[None] & key_ok[:, None, :]  # [B, T, end]
        allowed = allowed | (cols[None, None, :] == qcol[None, :, None])  # a pad query sees itself
        # queries of the `group` heads sharing a K/V head are folded into the query axis
        mask = allowed[:, None, None].expand(B, 1, group, T, end).reshape(B, 1, group * T, end)
        flat = pos.reshape(-1)
        cos, sin = m.cos[flat], m.sin[flat]
        x = m.embed_tokens(tokens)
        feats: list[torch.Tensor] = []
        for i, b in enumerate(m.blocks):
            if i in capture:
                feats.append(x)
            h = rms_norm(x, b.attn_norm, cfg.rms_eps)
            q, k, v = b.project_qkv(h)
            if b.q_bias is not None:
                q, k, v = q + b.q_bias.to(q.dtype), k + b.k_bias.to(k.dtype), v + b.v_bias.to(v.dtype)
            q = q.reshape(B * T, cfg.n_heads, cfg.head_dim)
            k = k.reshape(B * T, cfg.n_kv_heads, cfg.head_dim)
            v = v.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
            if b.q_norm is not None:
                q, k = rms_norm(q, b.q_norm, cfg.rms_eps), rms_norm(k, b.k_norm, cfg.rms_eps)
            q = rope.apply_rope(q, cos, sin, cfg.rope_style).view(B, T, cfg.n_heads, cfg.head_dim)
            k = rope.apply_rope(k, cos, sin, cfg.rope_style).view(B, T, cfg.n_kv_heads, cfg.head_dim)
            self.k[i][:, :, start:end] = k.transpose(1, 2).to(self.kv_dtype)
            self.v[i][:, :, start:end] = v.transpose(1, 2).to(self.kv_dtype)
            qh = q.view(B, T, cfg.n_kv_heads, group, cfg.head_dim).permute(0, 2, 3, 1, 4)
            qh = qh.reshape(B, cfg.n_kv_heads, group * T, cfg.head_dim)
            kh = self.k[i][:, :, :end].to(q.dtype)
            vh = self.v[i][:, :, :end].to(q.dtype)
            with sdpa_kernel(_SDPA_BACKENDS):
                a = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=m.scale)
            a = a.view(B, cfg.n_kv_heads, group, T, cfg.head_dim).permute(0, 3, 1, 2, 4)
            x = x + b.o(a.reshape(B, T, cfg.n_heads * cfg.head_dim).to(x.dtype))
            h = rms_norm(x, b.ffn_norm, cfg.rms_eps)
            g, u = b.project_gate_up(h)
            x = x + b.down(F.silu(g) * u)
        if cfg.n_layers in capture:
            feats.append(x)
        logits = m.lm_head(rms_norm(x[:, -1], m.out_norm, cfg.rms_eps)).float()
        return logits, (torch.cat(feats, dim=-1) if feats else None)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new: int, stop_ids: Sequence[int] = (),
                 capture: Sequence[int] = (), feature_dtype: torch.dtype | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Batch:
        """Greedy continuations of ``prompts`` (at most ``max_new`` tokens each; a stop id ends a
        row and is kept as its last token), with the ``capture`` features of every fed position.
        ``should_stop`` (polled every few steps) cuts every row short, e.g. at a time budget."""
        m, cfg = self.m, self.cfg
        dev = m.device
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("batched generation needs non-empty prompts")
        B = len(prompts)
        P = max(len(p) for p in prompts)
        L = P + max_new
        if L > m.cos.shape[0]:
            raise ConfigError(f"prompt + generation ({L} positions) exceeds the model's RoPE table "
                              f"({m.cos.shape[0]} positions)", remedy="load the target with a larger ctx")
        plen = torch.tensor([len(p) for p in prompts], device=dev)
        pad = P - plen
        host = torch.zeros((B, L), dtype=torch.long)
        for r, p in enumerate(prompts):
            host[r, P - len(p):P] = torch.tensor(list(p), dtype=torch.long)
        toks = host.to(dev)
        cols = torch.arange(L, device=dev)
        key_ok = cols[None, :] >= pad[:, None]
        pos_all = (cols[None, :] - pad[:, None]).clamp(min=0)
        shape = (B, cfg.n_kv_heads, L, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=self.kv_dtype, device=dev) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=self.kv_dtype, device=dev) for _ in range(cfg.n_layers)]
        fdt = feature_dtype or m.dtype
        feats = (torch.zeros((B, L, len(capture) * cfg.hidden), dtype=fdt, device=dev) if capture else None)
        stops = torch.tensor(sorted(set(int(s) for s in stop_ids)) or [-1], device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        gen_len = torch.full((B,), max_new, dtype=torch.long, device=dev)
        logits, f = self._forward(toks[:, :P], 0, pos_all[:, :P], key_ok[:, :P], capture)
        if feats is not None:
            feats[:, :P] = f.to(fdt)
        n = 0
        for t in range(max_new):
            nxt = logits.argmax(-1)
            toks[:, P + t] = torch.where(done, torch.zeros_like(nxt), nxt)
            hit = torch.isin(nxt, stops) & ~done
            gen_len = torch.where(hit, torch.full_like(gen_len, t + 1), gen_len)
            done = done | hit
            n = t + 1
            if t + 1 == max_new:
                break
            if (t % 8 == 7) and (bool(done.all()) or (should_stop is not None and should_stop())):
                break
            c = P + t
            logits, f = self._forward(toks[:, c:c + 1], c, pos_all[:, c:c + 1], key_ok[:, :c + 1], capture)
            if feats is not None:
                feats[:, c] = f[:, 0].to(fdt)
        gen_len = gen_len.clamp(max=n)
        self.k, self.v = [], []
        # right-align: row r's real columns pad[r] .. P+gen_len[r]-1 move to 0 ..
        lens = plen + gen_len
        Lr = int(lens.max())
        idx = (pad[:, None] + torch.arange(Lr, device=dev)[None, :]).clamp(max=L - 1)
        live = torch.arange(Lr, device=dev)[None, :] < lens[:, None]
        out_t = torch.where(live, toks.gather(1, idx), torch.zeros_like(idx))
        out_f = None
        if feats is not None:
            fed = torch.arange(Lr, device=dev)[None, :] < (lens - 1)[:, None]  # the last token was not fed
            out_f = feats.gather(1, idx[:, :, None].expand(B, Lr, feats.shape[-1]))
            out_f = out_f * fed[:, :, None].to(out_f.dtype)
        return Batch(out_t, out_f, lens, plen)

    @staticmethod
    def continuations(batch: Batch) -> list[list[int]]:
        """The generated ids of each row (stop token included), as lists."""
        toks, lens, plens = batch.tokens.cpu(), batch.lens.cpu(), batch.prompt_lens.cpu()
        return [toks[r, int(plens[r]):int(lens[r])].tolist() for r in range(toks.shape[0])]


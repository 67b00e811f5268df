"""Batched greedy generation with the target's own forward, for drafter training data.

luce's Session and KV stores hold one sequence; generating hundreds of thousands of tokens one
sequence at a time spends minutes in per-token launches. :class:`BatchedGreedy` decodes ``B``
sequences at once through ``Transformer.forward_batch`` (the model's own layers and layer ops
over the batch's rows, a plain K/V tensor per layer; see ``luce_core.lockstep``).

Prompts are left-padded to a common length so that every row decodes the same column each
step; a row's RoPE positions start at 0 at its first real token and the pad columns are masked
out of attention. Captured hidden states (the drafter's target features) are kept for every fed
position: the prefill's rows and each decode step's row, the same values a later forward over
the finished sequence would capture.
"""
from __future__ import annotations

from typing import Callable, Sequence

import attrs
import torch

from luce_core.plugin_api import ConfigError, Transformer


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
        self.kv_dtype = kv_dtype or model.dtype

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new: int, stop_ids: Sequence[int] = (),
                 capture: Sequence[int] = (), feature_dtype: torch.dtype | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Batch:
        """Greedy continuations of ``prompts`` (at most ``max_new`` tokens each; a stop id ends a
        row and is kept as its last token), with the ``capture`` features of every fed position.
        ``should_stop`` (polled every few steps) cuts every row short, e.g. at a time budget."""
        m = self.m
        dev = m.device
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("batched generation needs non-empty prompts")
        B = len(prompts)
        P = max(len(p) for p in prompts)
        L = P + max_new
        kv = m.lockstep_kv(B, L, self.kv_dtype)  # ConfigError past the model's positions
        plen = torch.tensor([len(p) for p in prompts], device=dev)
        pad = P - plen
        host = torch.zeros((B, L), dtype=torch.long)
        for r, p in enumerate(prompts):
            host[r, P - len(p):P] = torch.tensor(list(p), dtype=torch.long)
        toks = host.to(dev)
        cols = torch.arange(L, device=dev)
        key_ok = cols[None, :] >= pad[:, None]
        pos_all = (cols[None, :] - pad[:, None]).clamp(min=0)
        fdt = feature_dtype or m.dtype
        feats = (torch.zeros((B, L, len(capture) * m.config.hidden), dtype=fdt, device=dev) if capture else None)
        stops = torch.tensor(sorted(set(int(s) for s in stop_ids)) or [-1], device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        gen_len = torch.full((B,), max_new, dtype=torch.long, device=dev)
        out = m.forward_batch(toks[:, :P], 0, kv, pos_all[:, :P], key_ok[:, :P], capture)
        logits = out.logits
        if feats is not None:
            feats[:, :P] = out.features.to(fdt)
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
            out = m.forward_batch(toks[:, c:c + 1], c, kv, pos_all[:, c:c + 1], key_ok[:, :c + 1], capture)
            logits = out.logits
            if feats is not None:
                feats[:, c] = out.features[:, 0].to(fdt)
        gen_len = gen_len.clamp(max=n)
        del kv
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


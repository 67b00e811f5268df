"""One DFlash drafting step with static shapes, replayed as one CUDA graph.

A drafting step is ~80 small launches even through ``runtime.FusedForward`` (context rows, their
K/V for every layer, the block's denoising forward, the target's head), so eagerly Python launch
overhead, not the GPU, sets its cost. Here the step takes static shapes and replays as one graph:

- the new context rows are always ``block`` rows written from position ``new0``: rows past the
  committed length n are garbage, never visible (attention masks positions >= n) and rewritten
  once those positions are committed;
- attention reads a fixed window of ``window`` cache rows ending at n, gathered by index, with
  the rows before position 0 masked: exactly the rows [max(0, n - window), n) the eager step reads.

It works on what it is given: the fused forward, the K/V cache tensors it updates in place, and
the target's embedding and head as functions. Inputs (the new rows' features, new0, n, the
pending token) live in static device buffers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from luce_core.plugin_api import capture_graph

if TYPE_CHECKING:
    from luce_drafters.dflash.runtime import FusedForward


class GraphedDraftStep:
    """k_cache / v_cache: [layers, capacity, kv_heads, head_dim] (written in place); embed: token
    ids [1] -> target embedding rows; head: drafter hidden states -> f32 logits."""

    def __init__(self, fused: "FusedForward", k_cache: torch.Tensor, v_cache: torch.Tensor,
                 embed: Callable[[torch.Tensor], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor]):
        cfg = fused.cfg
        dev = k_cache.device
        self.fused, self.k_cache, self.v_cache, self.embed, self.head = fused, k_cache, v_cache, embed, head
        self.block = cfg.block
        self.capacity = k_cache.shape[1]
        self.window = min(cfg.window, self.capacity)
        self.feats = torch.zeros(cfg.block, cfg.feature_width, dtype=k_cache.dtype, device=dev)
        self.new0 = torch.zeros(1, dtype=torch.long, device=dev)
        self.n = torch.zeros(1, dtype=torch.long, device=dev)
        self.first = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # draft rows -> graph, output

    def fits(self, new: int, n: int) -> bool:
        """Whether a step with context rows [new, n) to add can run as the graph."""
        return n - new <= self.block and new + self.block <= self.capacity

    @torch.inference_mode()
    def body(self, rows: int) -> torch.Tensor:
        """The step on the static buffers (what the graph records): draft logits [rows, vocab]."""
        dev = self.feats.device
        steps = torch.arange(self.block, device=dev)
        new_rows = self.new0 + steps
        k, v = self.fused.context_rows(self.feats, new_rows)
        self.k_cache.index_copy_(1, new_rows, k)
        self.v_cache.index_copy_(1, new_rows, v)
        wpos = self.n - self.window + torch.arange(self.window, device=dev)
        widx = wpos.clamp(min=0)
        h = self.fused.block_hidden(self.embed(self.first), self.n + steps, self.k_cache.index_select(1, widx),
                                    self.v_cache.index_select(1, widx), ctx_mask=wpos >= 0)
        return self.head(h[1:1 + rows])

    def run(self, feats: torch.Tensor | None, new: int, n: int, pending: int, rows: int) -> torch.Tensor:
        """Draft logits [rows, vocab] (rows <= block-1: only the depths the caller will offer
        go through the head) after adding context rows [new, n) (``feats``, their target
        features) with ``pending`` the token at position n. The graph's output buffer: read it
        before the next call."""
        if feats is not None and feats.shape[0]:
            self.feats[: feats.shape[0]].copy_(feats)
        self.new0.fill_(new)
        self.n.fill_(n)
        self.first.fill_(pending)
        if rows not in self.graphs:  # the warm-up runs write the same cache rows the replay writes
            self.graphs[rows] = capture_graph(lambda: self.body(rows))
        g, out = self.graphs[rows]
        g.replay()
        return out

"""One-graph decode: each decode step is a single CUDA-graph replay.

A graph is captured per attention window (powers of two up to the context) and per number of
tokens T (1 for plain decode, budget + 1 for a speculative chain verify), so a step whose last
position is p replays the smallest window > p: static shapes, no allocation and no host sync
inside, and short contexts do not pay for attending over the whole cache. Tokens and positions
live in static device buffers that are filled before replay.
"""
from __future__ import annotations

import torch

from luce_core.model import Transformer
from luce_core.roles import KVStore

MIN_WINDOW = 256


def windows(ctx: int) -> list[int]:
    out, w = [], MIN_WINDOW
    while w < ctx:
        out.append(w)
        w *= 2
    return out + [ctx]


class DecodeGraphs:
    def __init__(self, model: Transformer, kv: KVStore, ctx: int):
        if model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.model, self.kv, self.ctx = model, kv, ctx
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (window, T)
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # T -> static tokens, positions
        self.pool = torch.cuda.graph_pool_handle()
        self.windows = windows(ctx)

    def _capture(self, window: int, tokens: torch.Tensor, pos: torch.Tensor):
        # Warm up on a side stream (compiles/loads kernels, settles the allocator), then capture.
        # The buffers already hold this step's real tokens and positions, so the extra runs write
        # the very K/V the replay writes again: nothing else in the cache is touched.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.model.decode_static(tokens, pos, self.kv, window)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = self.model.decode_static(tokens, pos, self.kv, window)
        return g, out

    def run(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits [T, vocab] after ``tokens`` at positions start..start+T-1 (their K/V land in
        those slots)."""
        n = len(tokens)
        window = next(w for w in self.windows if w >= start + n)
        if n not in self.buffers:
            dev = self.model.device
            self.buffers[n] = (torch.zeros(n, dtype=torch.long, device=dev), torch.zeros(n, dtype=torch.long, device=dev))
        tok_buf, pos_buf = self.buffers[n]
        tok_buf.copy_(torch.tensor(tokens, dtype=torch.long))
        pos_buf.copy_(torch.arange(start, start + n))
        if (window, n) not in self.graphs:
            self.graphs[(window, n)] = self._capture(window, tok_buf, pos_buf)
        g, out = self.graphs[(window, n)]
        g.replay()
        return out

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [vocab] after ``token`` at ``position`` (its K/V lands in slot ``position``)."""
        return self.run([token], position)[0]

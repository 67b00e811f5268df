"""One-graph decode: each decode step is a single CUDA-graph replay.

A graph is captured per attention window (powers of two up to the context), so a step at
position p replays the smallest window > p: static shapes, no allocation and no host sync
inside, and short contexts do not pay for attending over the whole cache. The token and
position live in static device buffers that are filled before replay.
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
        self.token = torch.zeros(1, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=model.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.windows = windows(ctx)

    def _capture(self, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (compiles/loads kernels, settles the allocator), then capture.
        # The warm-up writes slot pos's K/V, which the real step rewrites before reading.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self.model.decode_static(self.token, self.pos, self.kv, window)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = self.model.decode_static(self.token, self.pos, self.kv, window)
        return g, out

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [vocab] after ``token`` at ``position`` (its K/V lands in slot ``position``)."""
        window = next(w for w in self.windows if w > position)
        self.token.fill_(token)
        self.pos.fill_(position)
        if window not in self.graphs:
            self.graphs[window] = self._capture(window)
        g, out = self.graphs[window]
        g.replay()
        return out[0]

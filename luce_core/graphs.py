"""One-graph decode: each decode step is a single CUDA-graph replay.

A graph is captured per attention window (powers of two up to the context), per number of
tokens T (1 for plain decode, up to budget + 1 for a speculative chain verify) and per set of
captured layers (a DFlash verify also returns target features), so a step whose last
position is p replays the smallest window > p: static shapes, no allocation and no host sync
inside, and short contexts do not pay for attending over the whole cache. Tokens and positions
live in static device buffers that are filled before replay.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

from luce_core.model import ForwardOut, Transformer
from luce_core.roles import KVStore

MIN_WINDOW = 256
T = TypeVar("T")


def windows(ctx: int) -> list[int]:
    out, w = [], MIN_WINDOW
    while w < ctx:
        out.append(w)
        w *= 2
    return out + [ctx]


def capture_graph(fn: Callable[[], T], pool: tuple | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` captured as a CUDA graph, and its output (static buffers the replays rewrite).
    It first runs twice on a side stream (loads kernels, settles the allocator), so running it
    must be harmless to repeat: the warm-up writes exactly what a replay writes."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = fn()
    return g, out


class DecodeGraphs:
    def __init__(self, model: Transformer, kv: KVStore, ctx: int):
        if model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.model, self.kv, self.ctx = model, kv, ctx
        # (window, T, capture) -> graph and its static output
        self.graphs: dict[tuple[int, int, tuple[int, ...]], tuple[torch.cuda.CUDAGraph, ForwardOut]] = {}
        # T -> static device [2, T] (tokens, positions), its pinned host staging copy, and an event
        # marking when the last upload from that staging copy was done
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.windows = windows(ctx)

    def _capture(self, window: int, tokens: torch.Tensor, pos: torch.Tensor, capture: tuple[int, ...]):
        # The buffers already hold this step's real tokens and positions, so the warm-up runs write
        # the very K/V the replay writes again: nothing else in the cache is touched.
        return capture_graph(lambda: self.model.decode_static(tokens, pos, self.kv, window, capture), self.pool)

    def run(self, tokens: list[int], start: int, capture: Sequence[int] = ()) -> ForwardOut:
        """Logits [T, vocab] (and captured features) after ``tokens`` at positions
        start..start+T-1 (their K/V land in those slots). The outputs are the graph's static
        buffers: read them before the next replay."""
        n = len(tokens)
        window = next(w for w in self.windows if w >= start + n)
        if n not in self.buffers:
            self.buffers[n] = (torch.zeros((2, n), dtype=torch.long, device=self.model.device),
                               torch.zeros((2, n), dtype=torch.long, pin_memory=True), torch.cuda.Event())
        dev, host, uploaded = self.buffers[n]
        uploaded.synchronize()  # the previous upload has read the staging copy: refill it
        staged = host.numpy()
        staged[0] = tokens
        staged[1] = range(start, start + n)
        dev.copy_(host, non_blocking=True)  # one asynchronous copy, no pageable staging
        uploaded.record()
        key = (window, n, tuple(capture))
        if key not in self.graphs:
            self.graphs[key] = self._capture(window, dev[0], dev[1], key[2])
        g, out = self.graphs[key]
        g.replay()
        return out

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [vocab] after ``token`` at ``position`` (its K/V lands in slot ``position``)."""
        return self.run([token], position).logits[0]

"""One-graph decode: each decode step is a single CUDA-graph replay.

A graph is captured per attention window (powers of two up to the context), per number of
tokens T (1 for plain decode, up to budget + 1 for a speculative chain verify), per set of
captured layers (a DFlash verify also returns target features) and per kind (chain, or a
padded draft tree with its ``TreeMask``), so a step whose last
position is p replays the smallest window > p: static shapes, no allocation and no host sync
inside, and short contexts do not pay for attending over the whole cache. Tokens and positions
live in static device buffers that are filled before replay.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from luce_core.model import ForwardOut, Transformer
from luce_core.contract.roles import KVStore
from luce_core.speculative.tree import DraftTree, TreeMask

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
        # (window, T, capture, tree) -> graph and its static output
        self.graphs: dict[tuple[int, int, tuple[int, ...], bool], tuple[torch.cuda.CUDAGraph, ForwardOut]] = {}
        # (T, tree) -> static device int64 buffer (chain: tokens, positions; tree: also slots, the
        # path table and the prefix length), its pinned host staging copy, and an event marking
        # when the last upload from that staging copy was done
        self.buffers: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = {}
        # greedy chains (run_greedy): (window, steps) -> graph and its logits; steps -> ids buffer
        self.greedy_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.greedy_ids: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.windows = windows(ctx)

    def _upload(self, n: int, tree: bool, fill: Callable[[np.ndarray], None]) -> torch.Tensor:
        """The static device buffer for (n, tree) after ``fill`` wrote its staging copy."""
        key = (n, tree)
        if key not in self.buffers:
            size = 3 * n + n * n + 1 if tree else 2 * n
            self.buffers[key] = (torch.zeros(size, dtype=torch.long, device=self.model.device),
                                 torch.zeros(size, dtype=torch.long, pin_memory=True), torch.cuda.Event())
        dev, host, uploaded = self.buffers[key]
        uploaded.synchronize()  # the previous upload has read the staging copy: refill it
        fill(host.numpy())
        dev.copy_(host, non_blocking=True)  # one asynchronous copy, no pageable staging
        uploaded.record()
        return dev

    def _replay(self, key: tuple, fn: Callable[[], T], table: dict | None = None) -> T:
        """Replay the graph of ``key`` in ``table`` (default: the forward graphs), capturing
        ``fn`` first if there is none; returns its static output."""
        table = self.graphs if table is None else table
        if key not in table:
            # The buffers already hold this step's real inputs, so the warm-up runs write the very
            # K/V the replay writes again: nothing else in the cache is touched.
            table[key] = capture_graph(fn, self.pool)
        g, out = table[key]
        g.replay()
        return out

    def run(self, tokens: list[int], start: int, capture: Sequence[int] = ()) -> ForwardOut:
        """Logits [T, vocab] (and captured features) after ``tokens`` at positions
        start..start+T-1 (their K/V land in those slots). The outputs are the graph's static
        buffers: read them before the next replay."""
        n = len(tokens)
        window = next(w for w in self.windows if w >= start + n)

        def fill(staged: np.ndarray) -> None:
            staged[:n] = tokens
            staged[n:] = range(start, start + n)

        dev = self._upload(n, False, fill)
        return self._replay((window, n, tuple(capture), False),
                            lambda: self.model.decode_static(dev[:n], dev[n:], self.kv, window, capture))

    def run_tree(self, tree: DraftTree, start: int, capture: Sequence[int] = ()) -> ForwardOut:
        """``run`` for a draft tree: its nodes' K/V land in slots start..start+T-1, at RoPE
        positions start + depth, under the ancestor-only ``TreeMask``."""
        n = tree.size
        window = next(w for w in self.windows if w >= start + n)

        def fill(staged: np.ndarray) -> None:
            staged[:n] = tree.tokens
            staged[n:2 * n] = np.asarray(tree.depths) + start
            staged[2 * n:3 * n] = range(start, start + n)
            staged[3 * n:-1] = tree.path_table(start).ravel()
            staged[-1] = start

        dev = self._upload(n, True, fill)

        def forward() -> ForwardOut:
            # the int32 views the attention kernels read are made inside the graph
            mask = TreeMask(positions=dev[n:2 * n], table=dev[3 * n:-1].view(n, n).to(torch.int32),
                            start=dev[-1:].to(torch.int32))
            return self.model.decode_static(dev[:n], dev[n:2 * n], self.kv, window, capture,
                                            slots=dev[2 * n:3 * n], mask=mask)

        return self._replay((window, n, tuple(capture), True), forward)

    def run_greedy(self, first: torch.Tensor, start: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with no host in the loop: ``first`` (a device id [1]) at position
        ``start``, then each next id the argmax of the logits before it, ``steps`` forwards in
        one replay (a draft model's chain of drafts). Returns (ids [steps + 1]: ``first`` and the
        argmaxes, logits [steps, vocab] they were taken from), static buffers: read them before
        the next replay. The K/V of ids[:steps] land in slots start..start+steps-1."""
        window = next(w for w in self.windows if w >= start + steps)

        def fill(staged: np.ndarray) -> None:
            staged[:steps] = 0  # the tokens half is unused: ids come from the device
            staged[steps:] = range(start, start + steps)

        pos = self._upload(steps, False, fill)[steps:]
        ids = self.greedy_ids.get(steps)
        if ids is None:
            ids = self.greedy_ids[steps] = torch.zeros(steps + 1, dtype=torch.long, device=self.model.device)
        ids[:1].copy_(first)

        def forward() -> torch.Tensor:
            rows = []
            for i in range(steps):
                logits = self.model.decode_static(ids[i:i + 1], pos[i:i + 1], self.kv, window).logits
                ids[i + 1:i + 2].copy_(torch.argmax(logits, dim=-1))
                rows.append(logits)
            return torch.cat(rows)

        return ids, self._replay((window, steps), forward, self.greedy_graphs)

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [vocab] after ``token`` at ``position`` (its K/V lands in slot ``position``)."""
        return self.run([token], position).logits[0]

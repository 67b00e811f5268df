"""Draft trees for tree verification (DDTree): construction, flattening, attention masks.

A tree holds ``N`` nodes in depth-first order. Node 0 is the root: the last committed-but-not-yet-
verified token (its K/V are written by the verify forward, like every node). Every other node
is a draft token whose parent is an earlier node. Children are listed in the drafter's rank order
(most likely first), so the greedy chain root -> top-1 -> top-1 ... occupies indices 0, 1, 2, ...
contiguously; when the target accepts along that chain, the accepted K/V already sit in the
right KV slots and nothing needs to move.

Verification runs the N nodes in one target forward at KV slots [n, n+N) with

* positions ``n + depth`` (siblings share a RoPE position), and
* an ancestor-only mask: node i attends to the committed prefix [0, n), to its ancestors and to
  itself, nothing else.

The mask goes to attention as a :class:`TreeMask`: per node the slots of its path, root first.
It has static shapes (nothing depends on the prefix length but tensor values), so a tree verify
can be replayed as a CUDA graph, and a kernel can lay each node's path out as consecutive
positions: node j then rounds exactly as a one-token decode step after accepting that path.

For a capturable (static-shape) verify the tree is padded to a fixed node count. A padding node
behaves like an extra depth-1 leaf: its mask row sees the prefix, the root and itself (a row with
nothing visible would make SDPA produce NaN K/V that poison later reads), and it is never the
child of anything, so the acceptance walk never reaches it.
"""
from __future__ import annotations

import heapq
from typing import Sequence

import attrs
import numpy as np
import torch

from luce_core.contract.errors import ConfigError


@attrs.frozen(eq=False)
class TreeMask:
    """Ancestor-only attention for a verify at slots [start, start+T), as device tensors.

    Row t sees every slot below ``start``, then the slots ``table[t, :d+1]`` (its path, root
    first, d = its depth) as the logical positions start .. ``positions[t]`` = start + d.
    Entries past a row's depth hold its own slot. Nothing here needs a host read, so it can live
    in static buffers that a CUDA graph replays with.
    """

    positions: torch.Tensor  # int64 [T]: start + depth (also the RoPE positions of a tree)
    table: torch.Tensor  # int32 [T, W]: absolute slots, W >= max depth + 1
    start: torch.Tensor  # int32 [1]: the first slot of the verify (the committed length)

    def row(self, t: int) -> "TreeMask":
        """Row t alone: the mask of a one-row forward of node t (its slot is start + t)."""
        return TreeMask(positions=self.positions[t:t + 1], table=self.table[t:t + 1], start=self.start)

    def dense(self, end: int) -> torch.Tensor:
        """The same mask as bool [T, end] (end >= start + T), built on the tensors' device."""
        dev = self.table.device
        cols = torch.arange(end, device=dev)
        m = (cols[None, :] < self.start.to(torch.long)).expand(self.table.shape[0], end).clone()
        return m.scatter_(1, self.table.to(torch.long), True)

    @classmethod
    def from_dense(cls, mask: torch.Tensor, start: int, device: torch.device | str) -> "TreeMask | None":
        """A bool mask [T, start+T] whose rows all see the whole prefix as a TreeMask (row t's
        visible window slots in slot order), or None when some row does not (one host read)."""
        m = mask.detach().to("cpu", torch.bool)
        if m.dim() != 2 or m.shape[1] != start + m.shape[0] or not bool(m[:, :start].all()):
            return None
        t = m.shape[0]
        w = m[:, start:]
        cols = torch.arange(t)
        first = torch.where(w, cols, cols + t).sort(dim=1).values  # visible slots first, in order
        own = cols[:, None].expand(t, t)
        table = torch.where(first < t, first, own) + start
        count = w.sum(dim=1)
        return cls(positions=(start + count - 1).to(device, torch.int64),
                   table=table.to(device, torch.int32).contiguous(),
                   start=torch.tensor([start], dtype=torch.int32, device=device))


@attrs.frozen(eq=False)
class DraftTree:
    """A flattened draft tree. ``tokens[0]`` is the root; ``parents[0] == -1``.

    ``n_real`` nodes are real; nodes past it (if any) are padding (parent 0, depth 1).
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    n_real: int

    def __attrs_post_init__(self) -> None:
        n = len(self.tokens)
        if not (len(self.parents) == len(self.depths) == n) or n == 0:
            raise ValueError("tokens, parents and depths must have the same, non-zero length")
        if self.parents[0] != -1 or self.depths[0] != 0:
            raise ValueError("node 0 must be the root (parent -1, depth 0)")
        for i in range(1, n):
            p = self.parents[i]
            if not 0 <= p < i:
                raise ValueError(f"node {i}: parent {p} must be an earlier node")
            if self.depths[i] != self.depths[p] + 1:
                raise ValueError(f"node {i}: depth {self.depths[i]} is not its parent's depth + 1")
            if i >= self.n_real and p != 0:
                raise ValueError(f"padding node {i} must hang off the root")
        if not 1 <= self.n_real <= n:
            raise ValueError(f"n_real={self.n_real} outside [1, {n}]")

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths[: self.n_real])

    def children(self) -> list[dict[int, int]]:
        """Per node: draft token -> child index (real nodes only; first occurrence wins)."""
        out: list[dict[int, int]] = [{} for _ in range(self.size)]
        for i in range(1, self.n_real):
            out[self.parents[i]].setdefault(self.tokens[i], i)
        return out

    def ordered_children(self) -> list[list[int]]:
        """Per node: its real children's indices in rank order."""
        out: list[list[int]] = [[] for _ in range(self.size)]
        for i in range(1, self.n_real):
            out[self.parents[i]].append(i)
        return out

    def path_to(self, node: int) -> list[int]:
        """Node indices root .. node."""
        path = [node]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def ancestor_mask(self) -> torch.Tensor:
        """bool [N, N]: [i, j] is True when j is i itself or one of its ancestors."""
        n = self.size
        m = np.zeros((n, n), dtype=bool)
        for i in range(n):
            m[i, i] = True
            p = self.parents[i]
            if p >= 0:
                m[i] |= m[p]  # parents come first, so their row is complete
        return torch.from_numpy(m)

    def attention_mask(self, prefix: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """bool [N, prefix + N] for ``Transformer.forward(mask=...)``: all of the committed prefix
        plus the ancestor-only block."""
        anc = self.ancestor_mask()
        full = torch.ones((self.size, prefix + self.size), dtype=torch.bool)
        full[:, prefix:] = anc
        return full.to(device)

    def path_table(self, prefix: int) -> np.ndarray:
        """int32 [N, N]: row i = the slots prefix + (node of i's path at each depth), root
        first, then i's own slot (``TreeMask.table``)."""
        n = self.size
        t = np.repeat((prefix + np.arange(n, dtype=np.int32))[:, None], n, axis=1)
        for i in range(n):
            p = self.parents[i]
            if p >= 0:
                d = self.depths[i]
                t[i, :d] = t[p, :d]  # parents come first: their path is complete
        return t

    def tree_mask(self, prefix: int, device: torch.device | str = "cpu") -> TreeMask:
        """The ancestor-only mask for a verify after ``prefix`` committed slots."""
        return TreeMask(positions=self.positions(prefix, device),
                        table=torch.from_numpy(self.path_table(prefix)).to(device),
                        start=torch.tensor([prefix], dtype=torch.int32, device=device))

    def positions(self, prefix: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """RoPE positions ``prefix + depth`` as int64 [N]."""
        return (torch.tensor(self.depths, dtype=torch.long) + prefix).to(device)

    def padded(self, size: int) -> "DraftTree":
        """This tree with padding nodes appended up to ``size`` nodes (static verify shapes)."""
        if size < self.n_real:
            raise ValueError(f"cannot pad a tree of {self.n_real} nodes to {size}")
        extra = size - self.size
        if extra <= 0:
            return self
        root = self.tokens[0]
        return DraftTree(self.tokens + (root,) * extra, self.parents + (0,) * extra,
                         self.depths + (1,) * extra, self.n_real)


def chain_tree(root: int, drafts: Sequence[int]) -> DraftTree:
    """A chain root -> d1 -> d2 ... as a tree."""
    toks = (int(root), *(int(d) for d in drafts))
    return DraftTree(toks, tuple(range(-1, len(toks) - 1)), tuple(range(len(toks))), len(toks))


def trie_tree(root: int, branches: Sequence[Sequence[int]], budget: int) -> DraftTree:
    """Merge candidate continuations (best first) into a trie of at most ``budget`` draft nodes.

    Branches are taken in order and cut when the budget runs out, so the first branch becomes the
    DFS-first chain.
    """
    if budget < 0:
        raise ConfigError(f"draft budget must be >= 0, got {budget}")
    # children as insertion-ordered dicts: token -> node id (node ids in insertion order)
    kids: list[dict[int, int]] = [{}]
    toks: list[int] = [int(root)]
    for br in branches:
        node = 0
        for t in br:
            t = int(t)
            nxt = kids[node].get(t)
            if nxt is None:
                if len(toks) - 1 >= budget:
                    break
                nxt = len(toks)
                toks.append(t)
                kids.append({})
                kids[node][t] = nxt
            node = nxt
    return _flatten(toks, kids)


def _flatten(toks: list[int], kids: list[dict[int, int]]) -> DraftTree:
    """Depth-first order, children in insertion (rank) order."""
    out_t: list[int] = []
    out_p: list[int] = []
    out_d: list[int] = []
    stack: list[tuple[int, int, int]] = [(0, -1, 0)]  # (node id, parent's new index, depth)
    while stack:
        node, parent, depth = stack.pop()
        idx = len(out_t)
        out_t.append(toks[node])
        out_p.append(parent)
        out_d.append(depth)
        for child in reversed(list(kids[node].values())):
            stack.append((child, idx, depth + 1))
    return DraftTree(tuple(out_t), tuple(out_p), tuple(out_d), len(out_t))


def topk_logprobs(logprobs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position the ``k`` best (log-prob, token id), best first: float64/int64 [L, k]."""
    k = min(k, logprobs.shape[-1])
    vals, ids = torch.topk(logprobs.float(), k, dim=-1)
    return vals.double().cpu().numpy(), ids.cpu().numpy()


def build_ddtree(root: int, top_lp: np.ndarray, top_ids: np.ndarray, budget: int,
                 chain_seed: bool = True) -> DraftTree:
    """Best-first draft tree under a node budget (DDTree).

    ``top_lp``/``top_ids`` ([L, K], best first) are the drafter's per-position top-K log-probs
    for depths 1..L. A node's weight is the sum of its path's log-probs. Nodes are taken from a
    max-heap on weight; taking a node offers its next-ranked sibling and its first child. With
    ``chain_seed`` the whole top-1 chain goes in first (it is where most of the acceptance is)
    and each chain node offers its rank-1 sibling. Stops at ``budget`` draft nodes.
    """
    if budget < 0:
        raise ConfigError(f"draft budget must be >= 0, got {budget}")
    L, K = top_lp.shape if top_lp.ndim == 2 else (0, 0)
    toks: list[int] = [int(root)]
    kids: list[dict[int, int]] = [{}]
    if L == 0 or K == 0 or budget == 0:
        return _flatten(toks, kids)
    heap: list[tuple[float, int, int, int, int, float]] = []  # (-w, seq, parent, depth, rank, parent_w)
    seq = 0

    def offer(parent: int, depth: int, rank: int, parent_w: float) -> None:
        nonlocal seq
        if depth <= L and rank < K:
            w = parent_w + float(top_lp[depth - 1, rank])
            heapq.heappush(heap, (-w, seq, parent, depth, rank, parent_w))
            seq += 1

    def add(parent: int, depth: int, rank: int) -> int:
        tok = int(top_ids[depth - 1, rank])
        if tok in kids[parent]:  # duplicate ids cannot happen with topk, but stay safe
            return kids[parent][tok]
        node = len(toks)
        toks.append(tok)
        kids.append({})
        kids[parent][tok] = node
        return node

    if chain_seed:
        # the chain is min(L, budget) long: either it reaches depth L (no first child to offer)
        # or it fills the budget
        node, w = 0, 0.0
        for d in range(1, min(L, budget) + 1):
            offer(node, d, 1, w)  # the chain node's rank-1 sibling
            node = add(node, d, 0)
            w += float(top_lp[d - 1, 0])
    else:
        offer(0, 1, 0, 0.0)
    while heap and len(toks) - 1 < budget:
        negw, _, parent, depth, rank, parent_w = heapq.heappop(heap)
        node = add(parent, depth, rank)
        offer(parent, depth, rank + 1, parent_w)
        offer(node, depth + 1, 0, -negw)
    return _flatten(toks, kids)

"""Prompt lookup: draft the continuation of an earlier occurrence of the context's last n-gram.

No weights. Tries the longest suffix n-gram first (``ngram_max`` down to ``ngram_min``) and uses
every earlier occurrence of the first size that matches, most recent first. Chain mode drafts
the continuation after the most recent occurrence; tree mode merges the continuations of up to
``max_branches`` occurrences into a trie under the node budget. The drafts are deterministic
(one-hot draft distribution at temperature > 0).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from luce_core.speculative import DrafterOptions, DraftRequest, Proposal, Target
from luce_core.tree import trie_tree


class PromptLookupDrafter:
    name = "prompt-lookup"
    capture: tuple[int, ...] = ()
    supports_tree = True

    def __init__(self, caps: Any = None, config: Any = None, options: DrafterOptions | None = None,
                 max_branches: int = 8):
        self.options = options or DrafterOptions()
        self.max_branches = max_branches

    def bind(self, target: Target, options: DrafterOptions) -> None:
        self.options = options  # validated by DrafterOptions; nothing in the target to check

    def matches(self, tokens: Sequence[int]) -> tuple[int, np.ndarray]:
        """(n-gram size, start indices of the continuations, most recent first)."""
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(self.options.ngram_max, self.options.ngram_min - 1, -1):
            if arr.size <= n:
                continue
            # windows over arr[:-1] so every hit has at least one token after it
            win = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.nonzero((win == arr[-n:]).all(axis=1))[0]
            if hits.size:
                return n, (hits + n)[::-1]
        return 0, np.empty(0, dtype=np.int64)

    def propose(self, tokens: Sequence[int], budget: int, *, request: DraftRequest | None = None) -> Proposal:
        depth = budget if request is None else min(budget, request.max_depth)
        if depth <= 0:
            return Proposal()
        _, starts = self.matches(tokens)
        if starts.size == 0:
            return Proposal()
        conts = [list(tokens[s:s + depth]) for s in starts[: self.max_branches]]
        if request is not None and request.tree:
            return Proposal(tokens=tuple(conts[0]), tree=trie_tree(int(tokens[-1]), conts, budget))
        return Proposal(tokens=tuple(int(t) for t in conts[0]))

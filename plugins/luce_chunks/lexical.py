"""A drafter-free chunk selector: keep the prompt's anchors and the chunks that share the
query's rare tokens.

Each chunk is scored by the IDF-weighted count of query tokens it contains (IDF over the
prompt's chunks, so a token that appears everywhere counts for little and a rare one — the
needle a question points at — counts for much). The first and last chunks are always kept
(instructions usually sit at the start, the question at the end); the rest fill the budget by
score, ties to the later chunk. This is the lexical half of PFlash-style selection; a
drafter-scored selector can plug in beside it under another name.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from luce_core.plugin_api import ConfigError


class LexicalSelector:
    def __init__(self, caps: object = None, config: object = None):
        pass

    def select(self, prompt_ids: Sequence[int], query_ids: Sequence[int], *,
               chunk_size: int, keep_ratio: float) -> list[int]:
        if chunk_size <= 0:
            raise ConfigError(f"chunk_size must be > 0, got {chunk_size}")
        if not 0 < keep_ratio <= 1:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        n = math.ceil(len(prompt_ids) / chunk_size)
        if n == 0:
            return []
        # at least the two anchors plus the best-scoring chunk, however small the ratio
        budget = min(n, max(3, round(n * keep_ratio)))
        chunks = [set(prompt_ids[i * chunk_size:(i + 1) * chunk_size]) for i in range(n)]
        df = Counter(t for c in chunks for t in c)
        query = Counter(query_ids)
        scores = [sum(cnt * math.log((n + 1) / (df[t] + 0.5)) for t, cnt in query.items() if t in c)
                  for c in chunks]
        anchors = [0, n - 1][: budget]
        ranked = sorted((i for i in range(n) if i not in anchors), key=lambda i: (-scores[i], -i))
        return sorted(set(anchors) | set(ranked[: budget - len(set(anchors))]))

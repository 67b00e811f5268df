"""The lexical chunk selector keeps anchors and the chunk holding the query's rare tokens."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from luce_chunks.lexical import LexicalSelector
from luce_core.contract.errors import ConfigError


@settings(max_examples=40, deadline=None)
@given(n_chunks=st.integers(4, 40), needle_chunk=st.data(), ratio=st.floats(0.05, 0.5))
def test_needle_chunk_is_kept(n_chunks: int, needle_chunk: st.DataObject, ratio: float) -> None:
    size = 16
    filler = [100 + (i % 50) for i in range(n_chunks * size)]  # common tokens, in every chunk
    where = needle_chunk.draw(st.integers(1, n_chunks - 2))
    prompt = list(filler)
    prompt[where * size + 3: where * size + 6] = [7, 8, 9]  # the rare "needle"
    query = [100, 101, 8, 9]
    kept = LexicalSelector().select(prompt, query, chunk_size=size, keep_ratio=ratio)
    assert where in kept
    assert kept[0] == 0 and kept[-1] == n_chunks - 1  # anchors
    assert kept == sorted(set(kept))
    assert len(kept) == min(n_chunks, max(3, round(n_chunks * ratio)))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        LexicalSelector().select([1, 2, 3], [1], chunk_size=0, keep_ratio=0.5)
    with pytest.raises(ConfigError):
        LexicalSelector().select([1, 2, 3], [1], chunk_size=2, keep_ratio=0)

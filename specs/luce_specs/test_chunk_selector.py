"""Spec of the ``chunk_selector`` role, generic over selectors: the kept chunks are ascending,
unique, in range, about ``keep_ratio`` of them (anchors and rescued chunks may add a few), all of
them at keep_ratio 1, and the same for the same input."""
from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from luce_core.plugin_api import ModelConfig, RunConfig
from luce_specs.hyp import spec_settings

LUCE_ROLE = "chunk_selector"
VOCAB = 300
_MODEL = ModelConfig(arch="llama", n_layers=1, hidden=64, ffn=64, n_heads=2, n_kv_heads=1, head_dim=32,
                     vocab=VOCAB, ctx_train=4096)
LUCE_VARIANTS = {"": RunConfig(model=_MODEL)}
SLACK = 3  # chunks an anchor/rescue policy may keep beyond (or below) the ratio


@spec_settings(30)
@given(prompt=st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=400),
       query=st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=20),
       chunk_size=st.sampled_from([8, 16, 32, 64]), keep_ratio=st.sampled_from([0.1, 0.25, 0.5, 0.8, 1.0]))
def test_selection_properties(subject, prompt: list[int], query: list[int], chunk_size: int, keep_ratio: float) -> None:
    selector = subject.create()
    got = selector.select(prompt, query, chunk_size=chunk_size, keep_ratio=keep_ratio)
    n = math.ceil(len(prompt) / chunk_size)
    assert all(isinstance(i, int) for i in got)
    assert list(got) == sorted(set(got)), f"not ascending and unique: {got}"
    assert all(0 <= i < n for i in got), f"index out of range(0, {n}): {got}"
    assert abs(len(got) - keep_ratio * n) <= SLACK + 0.1 * n, f"kept {len(got)} of {n} chunks at ratio {keep_ratio}"
    if keep_ratio == 1.0:
        assert list(got) == list(range(n))
    assert selector.select(prompt, query, chunk_size=chunk_size, keep_ratio=keep_ratio) == got
    assert subject.create().select(prompt, query, chunk_size=chunk_size, keep_ratio=keep_ratio) == got

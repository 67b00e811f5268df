"""Spec of the ``drafter`` role, generic over drafters: proposals are valid token ids of the
target's vocabulary, within the budget, and the same for the same input (a drafter keeps state
between calls, e.g. a KV cache; that state must not change what it proposes)."""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from luce_core.plugin_api import LuceError
from luce_specs.hyp import spec_settings

LUCE_ROLE = "drafter"
SETTINGS = spec_settings(10)
VOCAB = 300

# token histories over a small alphabet repeat n-grams, so lookup-style drafters have matches
histories = st.lists(st.integers(3, 14), min_size=1, max_size=24)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A tiny synthetic llama planned by luce: what a drafter binds to (and its draft model)."""
    from luce_core.plugin_api import probe
    from luce_core.plugin_api import RunConfig
    from luce_core.plugin_api import build
    from luce_core.plugin_api import Target
    from luce_tools.models.synth import write_synthetic_gguf

    path = str(tmp_path_factory.mktemp("drafter") / "tiny.gguf")
    write_synthetic_gguf(path, arch="llama", hidden=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32,
                         ffn=64, vocab=VOCAB, return_weights=False)
    plan = build(RunConfig(model_path=path, progress=False, ctx=256), probe())
    yield Target(plan.model, plan.loaded.tokenizer, plan.ctx, plan), path


_bound: dict[tuple[str, int], Any] = {}


def _drafter(subject, target, copy: int) -> Any:
    """A drafter bound to the tiny target (two independent instances per implementation)."""
    key = (subject.id, copy)
    if key not in _bound:
        d = subject.create()
        if hasattr(d, "bind"):
            from luce_core.plugin_api import DrafterOptions

            tgt, path = target
            try:
                # a drafter that needs its own weights says how to make test ones (spec_options);
                # the others get the target itself as their draft model
                make = getattr(d, "spec_options", None)
                d.bind(tgt, make(tgt, os.path.dirname(path)) if make else DrafterOptions(draft_model=path))
            except LuceError as e:  # e.g. needs a trained drafter file: it says which
                _bound[key] = e
            else:
                _bound[key] = d
        else:
            _bound[key] = d
    d = _bound[key]
    if isinstance(d, LuceError):
        pytest.skip(f"drafter {subject.impl.name!r} cannot serve a generic target: {d}")
    return d


def _request(d: Any, target: Any, history: list[int], budget: int, tree: bool) -> Any:
    """The DraftRequest the speculative engine would pass. A drafter that reads target features
    (``capture``) gets them for the committed prefix, computed by the target as the engine does."""
    from luce_core.plugin_api import SamplingParams
    from luce_core.plugin_api import DraftRequest

    features = None
    capture = tuple(getattr(d, "capture", ()))
    if capture and len(history) > 1:
        from luce_core.plugin_api import FeatureMirror
        from luce_core.plugin_api import KVSpec
        from luce_torch.kv import TorchKVStorage

        tgt, _ = target
        m = tgt.model
        dev = m.device  # the target's (a CUDA target on a GPU machine)
        kv = TorchKVStorage().allocate(KVSpec(m.cfg.n_layers, m.cfg.n_kv_heads, m.cfg.head_dim, len(history),
                                              device=str(dev)))
        feats = m.forward(torch.tensor(history[:-1]), 0, kv, capture=capture).features
        features = FeatureMirror(TorchKVStorage(), len(history), feats.shape[-1], device=dev)
        features.write(0, feats)
        features.set_length(len(history) - 1)
    return DraftRequest(tokens=history, budget=budget, tree=tree, params=SamplingParams(),
                        generator=torch.Generator().manual_seed(0), max_depth=budget, features=features)


def _chain(p: Any) -> tuple[int, ...]:
    """The chain of draft ids in a proposal: a Proposal-like object's ``tokens`` or a sequence."""
    ids = getattr(p, "tokens", p)
    return tuple(int(t) for t in ids)


def _assert_distributions(rows: torch.Tensor | None, n: int | None, log: bool) -> None:
    if rows is None:
        return
    if n is not None:
        assert rows.shape[0] == n
    assert rows.shape[-1] >= VOCAB
    p = (rows.double().exp() if log else rows.double()).cpu()
    assert bool((p >= 0).all()) and torch.allclose(p.sum(-1), torch.ones(p.shape[0], dtype=torch.float64), atol=1e-3)


def _assert_valid(p: Any, history: Sequence[int], budget: int) -> None:
    chain = _chain(p)
    assert len(chain) <= budget, f"{len(chain)} drafts for a budget of {budget}"
    assert all(0 <= t < VOCAB for t in chain), f"invalid token id in {chain}"
    _assert_distributions(getattr(p, "probs", None), len(chain), log=False)
    _assert_distributions(getattr(p, "logprobs", None), None, log=True)
    tree = getattr(p, "tree", None)
    if tree is not None:
        assert tree.tokens[0] == history[-1], "the tree's root is the pending token"
        assert tree.n_real - 1 <= budget and all(0 <= t < VOCAB for t in tree.tokens[: tree.n_real])


def _same(a: Any, b: Any) -> bool:
    if _chain(a) != _chain(b):
        return False
    for field in ("probs", "logprobs"):
        x, y = getattr(a, field, None), getattr(b, field, None)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    ta, tb = getattr(a, "tree", None), getattr(b, "tree", None)
    return (ta is None) == (tb is None) and (ta is None or (ta.tokens, ta.parents) == (tb.tokens, tb.parents))


@SETTINGS
@given(history=histories, budget=st.integers(0, 6), other=histories)
def test_chain_proposals(subject, target, history: list[int], budget: int, other: list[int]) -> None:
    first, second = _drafter(subject, target, 0), _drafter(subject, target, 1)

    def ask(d: Any, h: list[int]) -> Any:
        return d.propose(h, budget, request=_request(d, target, h, budget, tree=False))

    p = ask(first, history)
    _assert_valid(p, history, budget)
    ask(first, other)  # whatever state that leaves must not leak into the next answer
    assert _same(ask(first, history), p)
    assert _same(ask(second, history), p)


@SETTINGS
@given(history=histories, budget=st.integers(1, 10))
def test_tree_proposals(subject, target, history: list[int], budget: int) -> None:
    first = _drafter(subject, target, 0)
    if not getattr(first, "supports_tree", False):
        pytest.skip(f"drafter {subject.impl.name!r} drafts chains only")
    p = first.propose(history, budget, request=_request(first, target, history, budget, tree=True))
    _assert_valid(p, history, budget)
    second = _drafter(subject, target, 1)
    assert _same(second.propose(history, budget, request=_request(second, target, history, budget, tree=True)), p)

"""Speculative decoding gives the target's own greedy tokens in every dtype (issue #29).

The verify forward must round each row exactly as the one-token decode step it replaces. The
torch reference declares what it can guarantee (``exact_rows``): its attention computes each
verify row over exactly the keys that decode step reads, and its matmuls are checked bit for bit
per row count (``luce_core.row_exact``); where they are not exact (f32 MKL GEMV vs GEMM, some
bf16 shapes) verification runs one token at a time.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import drafting_fixtures as fixtures
from luce_core.contract.drafting import DrafterOptions
from luce_core.contract.types import KVSpec
from luce_core.generate import PlainStepper, generate
from luce_core.row_exact import rows_exact
from luce_core.sampling import Sampler, SamplingParams
from luce_core.speculative.tree import DraftTree
from luce_core.speculative.wiring import make_drafter, stepper_for
from luce_torch.attention import TorchAttention
from luce_torch.kv import TorchKVStorage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the probe
def test_rows_exact_tells_row_invariant_matmuls_from_others():
    w = torch.randn(48, 32)
    assert rows_exact(lambda x: torch.stack([w @ r for r in x]), w, 5)  # row by row: exact by construction
    # a product whose rounding depends on the row count, as a GEMV-vs-GEMM switch does
    assert not rows_exact(lambda x: F.linear(x, w) + (1e-3 if x.shape[0] > 1 else 0.0), w, 4)
    assert rows_exact(lambda x: F.linear(x, w) + 1.0, w, 1)  # one row is trivially itself


# ----------------------------------------------------------------------------- torch attention rows
def _store(k_dtype: str, v_dtype: str, rotation: bool, n: int, cap: int = 64):
    spec = KVSpec(n_layers=1, n_kv_heads=2, head_dim=32, capacity=cap, k_dtype=k_dtype, v_dtype=v_dtype,
                  rotation=rotation, compute_dtype="bf16")
    kv = TorchKVStorage().allocate(spec)
    g = torch.Generator().manual_seed(n)
    kv.write(0, 0, torch.randn(n, 2, 32, generator=g).bfloat16(), torch.randn(n, 2, 32, generator=g).bfloat16())
    kv.set_length(n)
    return kv


@pytest.mark.parametrize("fmt", [("f16", "f16", False), ("bf16", "bf16", False), ("q8_0", "q4_0", True)], ids=str)
def test_torch_attention_verify_rows_are_decode_steps(fmt):
    """Chain rows with positions, and tree rows with a TreeMask, equal bit for bit the one-token
    decode step after their path (the path moved to consecutive slots, as acceptance does)."""
    att, n = TorchAttention(), 23
    q = torch.randn(6, 8, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    kv = _store(*fmt, n + 6)
    rows = att.forward(q, kv, 0, n, scale=0.2, positions=torch.arange(n, n + 6))
    for t in range(6):
        one = att.forward(q[t:t + 1], kv, 0, n + t, scale=0.2)
        assert torch.equal(rows[t:t + 1], one), t
    # a tree: root, two children of the root, a grandchild under the second child
    tree = DraftTree(tokens=(1, 2, 3, 4), parents=(-1, 0, 0, 2), depths=(0, 1, 1, 2), n_real=4)
    mask = tree.tree_mask(n, "cpu")
    got = att.forward(q[:4], kv, 0, n, scale=0.2, mask=mask)
    for t, path in enumerate(([0], [0, 1], [0, 2], [0, 2, 3])):
        moved = _store(*fmt, n + 6)  # the accepted path's K/V at consecutive slots n, n + 1, ...
        moved.move(torch.tensor([n + p for p in path]), n)
        one = att.forward(q[t:t + 1], moved, 0, n + len(path) - 1, scale=0.2)
        assert torch.equal(got[t:t + 1], one), (t, path)


def test_torch_attention_declares_row_exactness_on_the_cpu():
    assert TorchAttention().exact_rows(8)


# ----------------------------------------------------------------------------- end to end
WORDS = ("def", "return", "x", "=", "1", "+", "(", ")", ":", "\n", "the", "cat", "sat", "on", "mat", ".",
         "print", "hello", "world", "Hello", "Explain", "why", "sky", "blue", "?")


@pytest.fixture(scope="module")
def targets(smollm2_path, tmp_path_factory):
    """SmolLM2 on the torch backend in each dtype, with its drafters (built once)."""
    d = tmp_path_factory.mktemp("exact")
    out = {}
    for dtype in ("f32", "bf16", "f16"):
        llm = fixtures.load(smollm2_path, ctx=160, dtype=dtype, linear="torch", attention="torch",
                            kv_storage="torch")
        dflash = fixtures.random_dflash(llm.plan.model, d / f"dflash_{dtype}.safetensors", block=4, window=32, seed=4)
        drafters = {"prompt-lookup": make_drafter("prompt-lookup", llm.plan),
                    "draft-model": make_drafter("draft-model", llm.plan, DrafterOptions(draft_model=str(smollm2_path))),
                    "dflash": make_drafter("dflash", llm.plan, DrafterOptions(draft_model=dflash))}
        out[dtype] = (llm, drafters)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@settings(max_examples=4, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=4, max_size=20), tree=st.booleans(),
       drafter=st.sampled_from(["prompt-lookup", "draft-model", "dflash"]), budget=st.integers(1, 7))
def test_speculative_greedy_is_plain_greedy_in_every_dtype(targets, dtype, words, tree, drafter, budget):
    llm, drafters = targets[dtype]
    ids = llm.encode(" ".join(words))
    # from an empty cache both times: a reused prefix re-runs only the last prompt token, whose
    # one-row forward need not round as the prefill chunk it replaces (plain decoding's own caveat)
    llm.session.truncate(0)
    ref = list(generate(PlainStepper(llm.session), ids, 12, Sampler(SamplingParams()), frozenset()))
    llm.session.truncate(0)
    step = stepper_for(llm.plan, llm.session, drafters[drafter], budget=budget, tree=tree,
                       options=DrafterOptions(tree_topk=3))
    out = list(generate(step, ids, 12, Sampler(SamplingParams()), frozenset()))
    assert out == ref, (dtype, drafter, tree, budget, llm.tokenizer.decode(out), llm.tokenizer.decode(ref))
    if drafter == "draft-model":  # the target drafting for itself: its drafts hold
        assert step.stats.accepted > 0


def test_declared_exact_rows_verify_in_one_batch(targets):
    """Where the backend declares m-row forwards exact, the verify is one forward (no row-wise
    steps), and its rows are those decode steps: the output is still the plain greedy one."""
    llm, drafters = targets["bf16"]
    model = llm.plan.model
    saved = model._exact
    model._exact = (lambda m: True, saved[1])  # as a backend declaring exact multi-row matmuls
    try:
        ids = llm.encode("The cat sat on the mat. The cat sat on the mat. The cat")
        ref = list(generate(PlainStepper(llm.session), ids, 12, Sampler(SamplingParams()), frozenset()))
        for tree in (False, True):
            step = stepper_for(llm.plan, llm.session, drafters["draft-model"], budget=4, tree=tree)
            assert list(generate(step, ids, 12, Sampler(SamplingParams()), frozenset())) == ref
            assert step.stats.rowwise_steps == 0 and step.stats.accepted > 0
    finally:
        model._exact = saved


def test_undeclared_backend_verifies_row_by_row_and_says_so(targets):
    llm, drafters = targets["f32"]
    model = llm.plan.model
    saved = model._exact
    model._exact = (None, saved[1])  # a linear role that declares nothing
    try:
        ids = llm.encode("def add(a, b):\n    return a + b\n\ndef add(a, b):\n")
        ref = list(generate(PlainStepper(llm.session), ids, 10, Sampler(SamplingParams()), frozenset()))
        step = stepper_for(llm.plan, llm.session, drafters["prompt-lookup"], budget=4)
        with pytest.warns(UserWarning, match="one token at a time"):
            out = list(generate(step, ids, 10, Sampler(SamplingParams()), frozenset()))
        assert out == ref and step.stats.rowwise_steps == step.stats.offered_at[0] > 0  # every verify with drafts
        model._exact = (None, None)  # nor does its attention: trees are refused, not approximated
        from luce_core.contract.errors import ConfigError
        with pytest.raises(ConfigError, match="exact tree rows"):
            stepper_for(llm.plan, llm.session, drafters["prompt-lookup"], budget=4, tree=True)
    finally:
        model._exact = saved

"""Drafter plugins: descriptors, prompt lookup, draft-model tokenizer checks, and lossless
speculative decoding on the real SmolLM2."""
from __future__ import annotations

import subprocess
import sys

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from luce_core import plugin_host
from luce_core.contract.errors import ConfigError
from luce_core.contract.drafting import DrafterOptions, DraftRequest
from luce_core.generate import PlainStepper, generate
from luce_core.sampling import Sampler, SamplingParams
from luce_core.speculative.wiring import make_drafter, stepper_for
import drafting_fixtures as fixtures
from luce_drafters.draft_model import check_same_tokenizer
from luce_drafters.prompt_lookup import PromptLookupDrafter


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_plugin_declares_the_three_drafters_and_imports_nothing_heavy():
    names = {i.name for i in plugin_host.host().impls("drafter")}
    assert {"prompt-lookup", "draft-model", "dflash"} <= names
    code = ("import sys, luce_drafters.plugin as p; p.provide_drafter(); "
            "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _req(depth: int, tree: bool = False, budget: int = 8) -> DraftRequest:
    return DraftRequest(tokens=(), budget=budget, tree=tree, params=SamplingParams(), generator=torch.Generator(),
                        max_depth=depth)


def test_prompt_lookup_drafts_the_most_recent_continuation_of_the_longest_ngram():
    d = PromptLookupDrafter()
    toks = [1, 2, 3, 4, 1, 2, 3, 5, 9, 1, 2, 3]
    n, starts = d.matches(toks)
    assert n == 3 and list(starts) == [7, 3]
    assert d.propose(toks, 2, request=_req(8)).tokens == (5, 9)
    assert d.propose(toks, 8, request=_req(1)).tokens == (5,)  # capped by the depth that can be emitted
    p = d.propose(toks, 5, request=_req(3, tree=True, budget=5))
    # trie of the continuations [5, 9, 1] and [4, 1, 2] under a 5-node budget, most recent first
    assert p.tree.tokens == (3, 5, 9, 1, 4, 1) and p.tree.parents == (-1, 0, 1, 2, 0, 4)
    # shorter n-grams when the long ones do not recur; nothing when nothing recurs
    assert d.propose([7, 8, 9, 8], 3, request=_req(3)).tokens == (9, 8)
    assert d.propose([1, 2, 3], 3, request=_req(3)).tokens == ()


def _scan(tokens: list[int], n_min: int, n_max: int) -> tuple[int, list[int]]:
    """Oracle: every window of tokens[:-1] equal to the last n-gram, longest n first."""
    for n in range(n_max, n_min - 1, -1):
        hits = [i + n for i in range(len(tokens) - n) if tokens[i:i + n] == tokens[-n:]]
        if len(tokens) > n and hits:
            return n, hits[::-1]
    return 0, []


_edit = st.one_of(st.tuples(st.just("append"), st.lists(st.integers(0, 3), min_size=1, max_size=6)),
                  st.tuples(st.just("truncate"), st.integers(0, 40)),
                  st.tuples(st.just("rewrite"), st.integers(0, 40), st.integers(0, 3)),
                  st.tuples(st.just("new"), st.lists(st.integers(0, 3), max_size=30)))


@settings(max_examples=60, deadline=None)
@given(start=st.lists(st.integers(0, 3), max_size=30), edits=st.lists(_edit, max_size=12),
       n_min=st.integers(1, 3), extra=st.integers(0, 2))
def test_prompt_lookup_index_follows_growing_and_rewritten_histories(start, edits, n_min, extra):
    # the incremental index answers as a scan of the whole history does, after appends (a
    # generation), truncations (a rollback), a token changed in the middle and a new prompt
    d = PromptLookupDrafter(options=DrafterOptions(ngram_min=n_min, ngram_max=n_min + extra))
    hist = list(start)
    for edit in [("append", [])] + edits:
        if edit[0] == "append":
            hist = hist + edit[1]
        elif edit[0] == "truncate":
            hist = hist[:edit[1]]
        elif edit[0] == "rewrite" and hist:
            hist = list(hist)
            hist[edit[1] % len(hist)] = edit[2]
        elif edit[0] == "new":
            hist = list(edit[1])
        n, starts = d.matches(hist)
        assert (n, list(starts)) == _scan(hist, n_min, n_min + extra)


@attrs.define
class FakeTok:
    tokens: list[str]
    bos_id: int | None = 0

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def decode(self, ids):
        return "".join(self.tokens[i] for i in ids)


def test_tokenizer_mismatches_are_config_errors_naming_the_difference():
    a = FakeTok(["<s>", "a", "b", "c"])
    check_same_tokenizer(a, FakeTok(["<s>", "a", "b", "c"]), "T", "D", 4, 4)
    with pytest.raises(ConfigError, match=r"5 tokens.*has 4"):
        check_same_tokenizer(a, FakeTok(["<s>", "a", "b", "c", "d"]), "T", "D")
    with pytest.raises(ConfigError, match=r"1 token ids differ, first id 2: 'x' \(draft\) vs 'b' \(target\)"):
        check_same_tokenizer(a, FakeTok(["<s>", "a", "x", "c"]), "T", "D")
    with pytest.raises(ConfigError, match="outputs 8 logits but the target T outputs 4"):
        check_same_tokenizer(a, FakeTok(["<s>", "a", "b", "c"]), "T", "D", 4, 8)


def test_draft_model_with_another_vocabulary_is_refused(tmp_path):
    target = fixtures.load(fixtures.write_tiny(tmp_path / "t.gguf", vocab=300), ctx=64)
    other = fixtures.write_tiny(tmp_path / "d.gguf", vocab=320)
    with pytest.raises(ConfigError, match=r"vocabulary of 320 tokens but the target .* has 300"):
        make_drafter("draft-model", target.plan, DrafterOptions(draft_model=other))
    # a drafter that needs weights, forced without them, says which flag is missing
    with pytest.raises(ConfigError, match="--draft-model"):
        make_drafter("draft-model", target.plan)


# ----------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol(smollm2_path):
    return fixtures.load(smollm2_path, ctx=192)


PROMPT = "The cat sat on the mat. The dog sat on the log. The cat sat on the"


@pytest.mark.slow
def test_smollm2_speculative_greedy_equals_plain_greedy(smol, tmp_path):
    ids = smol.encode(PROMPT)
    ref = list(generate(PlainStepper(smol.session), ids, 16, Sampler(SamplingParams())))
    dflash = fixtures.random_dflash(smol.plan.model, tmp_path / "d.safetensors", block=4, window=32)
    # (drafter, tree, budget, weights, tokens): the untrained DFlash drafter accepts nothing, so
    # it runs fewer tokens; it checks that captured real-model features flow through a tree verify
    runs = [("prompt-lookup", False, 6, None, 16), ("prompt-lookup", True, 8, None, 16), ("dflash", True, 6, dflash, 6)]
    for name, tree, budget, path, n in runs:
        opts = DrafterOptions(draft_model=path, tree_topk=2)
        dec = stepper_for(smol.plan, smol.session, make_drafter(name, smol.plan, opts), budget=budget, tree=tree,
                          options=opts)
        out = list(generate(dec, ids, n, Sampler(SamplingParams())))
        assert out == ref[:n], (name, tree, smol.tokenizer.decode(out), smol.tokenizer.decode(ref))
        if name == "prompt-lookup":  # text that repeats itself: lookup drafts get accepted
            assert dec.stats.acceptance_length > 1.4, dec.stats.as_dict()


WORDS = ("the", "cat", "sat", "on", "mat", "dog", "log", "a", "red", "ball", "def", "return", "x", "=", "1", "+",
         "(", ")", ":", "\n", "print", "hello", "world", ".")


@pytest.fixture(scope="module")
def smol_drafts(smol, smollm2_path, tmp_path_factory):
    """Drafters for SmolLM2 that accept much (itself as its draft model), little (its first 4
    layers) or nothing (untrained DFlash of block 2, 4 and 8), built once per module."""
    from luce_tools.models.truncate import truncate_gguf

    d = tmp_path_factory.mktemp("smol_drafts")
    cut = d / "smollm2-4.gguf"
    truncate_gguf(smollm2_path, cut, [0, 1, 2, 3])
    files = {("draft-model", "self"): str(smollm2_path), ("draft-model", "cut"): str(cut)}
    for b in (2, 4, 8):
        files[("dflash", b)] = fixtures.random_dflash(smol.plan.model, d / f"dflash{b}.safetensors", block=b,
                                                     window=32, seed=b)
    return {key: make_drafter(key[0], smol.plan, DrafterOptions(draft_model=path, tree_topk=3))
            for key, path in [*files.items(), (("prompt-lookup", None), None)]}


@pytest.mark.slow
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("drafter", [("prompt-lookup", None), ("draft-model", "self"), ("draft-model", "cut"),
                                     ("dflash", 2), ("dflash", 4), ("dflash", 8)], ids=str)
@settings(max_examples=2, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=3, max_size=24), budget=st.integers(1, 7),
       static=st.booleans(), max_tokens=st.integers(4, 10))
def test_smollm2_speculative_greedy_property(smol, smol_drafts, words, drafter, budget, tree, static, max_tokens):
    """Random prompts, drafters, budgets, block sizes, chain or tree: the real model's speculative
    greedy output is its plain greedy output."""
    ids = smol.encode(" ".join(words))
    ref = list(generate(PlainStepper(smol.session), ids, max_tokens, Sampler(SamplingParams()), frozenset()))
    dec = stepper_for(smol.plan, smol.session, smol_drafts[drafter], budget=budget, tree=tree, static_shapes=static,
                      options=DrafterOptions(tree_topk=3))
    out = list(generate(dec, ids, max_tokens, Sampler(SamplingParams()), frozenset()))
    assert out == ref, (drafter, budget, tree, smol.tokenizer.decode(out), smol.tokenizer.decode(ref))
    if drafter == ("draft-model", "self"):  # its own drafts hold
        assert dec.stats.accepted > 0, dec.stats.as_dict()

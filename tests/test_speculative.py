"""The speculative engine: draft trees, masks, acceptance math, and losslessness end to end."""
from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from luce_core.contract.errors import ConfigError, ContextOverflowError, SelectionError
from luce_core.contract.drafting import DrafterOptions, DraftRequest, Proposal
from luce_core.generate import PlainStepper, Stats, generate
from luce_core.sampling import Sampler, SamplingParams
from luce_core.speculative.accept import (accept_chain, accept_tree, residual, sample_among, speculative_sample,
                                          target_distribution)
from luce_core.speculative.stats import SpecStats
from luce_core.speculative.stepper import SpeculativeStepper
from luce_core.speculative.tree import DraftTree, build_ddtree, chain_tree, trie_tree
from luce_core.speculative.wiring import make_drafter, stepper_for
import drafting_fixtures as fixtures

FEW = settings(max_examples=25, deadline=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    target = fixtures.write_tiny(d / "target.gguf", seed=0)
    draft = fixtures.write_tiny(d / "draft.gguf", seed=7)  # same tokenizer, other weights: real rejections
    llm = fixtures.load(target, ctx=96)
    dflash = {b: fixtures.random_dflash(llm.plan.model, d / f"dflash{b}.safetensors", block=b, seed=b)
              for b in (2, 4, 8)}
    return dict(dir=d, target=target, draft=draft, llm=llm, dflash=dflash)


# ----------------------------------------------------------------------------- trees
def _random_logprobs(rng: np.random.Generator, L: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    lp = -np.sort(rng.exponential(1.0, size=(L, K)), axis=1) - rng.uniform(0, 0.1, size=(L, 1))
    ids = np.stack([rng.choice(1000, size=K, replace=False) for _ in range(L)])
    return lp, ids


def _check_tree(t: DraftTree) -> None:
    kids = t.ordered_children()
    for node, ch in enumerate(kids):
        toks = [t.tokens[c] for c in ch]
        assert len(toks) == len(set(toks)), "siblings must be distinct tokens"
    for i in range(1, t.size):
        assert 0 <= t.parents[i] < i and t.depths[i] == t.depths[t.parents[i]] + 1


@FEW
@given(seed=st.integers(0, 2**31), L=st.integers(1, 5), K=st.integers(1, 4), budget=st.integers(0, 30))
def test_ddtree_best_first_takes_the_heaviest_nodes(seed, L, K, budget):
    rng = np.random.default_rng(seed)
    lp, ids = _random_logprobs(rng, L, K)
    tree = build_ddtree(5, lp, ids, budget, chain_seed=False)
    _check_tree(tree)
    # brute force: every node of the full K-ary tree of depth L with its path weight
    all_w = sorted((sum(lp[d, r] for d, r in enumerate(path))
                    for depth in range(1, L + 1) for path in itertools.product(range(K), repeat=depth)), reverse=True)
    assert tree.size - 1 == min(budget, len(all_w))
    got = []
    for node in range(1, tree.size):
        path = tree.path_to(node)[1:]
        got.append(sum(lp[tree.depths[n] - 1, list(ids[tree.depths[n] - 1]).index(tree.tokens[n])] for n in path))
    np.testing.assert_allclose(sorted(got, reverse=True), all_w[: len(got)], rtol=0, atol=1e-12)


@FEW
@given(seed=st.integers(0, 2**31), L=st.integers(1, 6), K=st.integers(1, 4), budget=st.integers(1, 25))
def test_ddtree_chain_seed_puts_the_greedy_chain_first(seed, L, K, budget):
    rng = np.random.default_rng(seed)
    lp, ids = _random_logprobs(rng, L, K)
    tree = build_ddtree(5, lp, ids, budget)
    _check_tree(tree)
    total = sum(K ** d for d in range(1, L + 1))
    assert tree.size - 1 == min(budget, total)
    chain = min(L, budget)
    assert tree.tokens[: chain + 1] == (5, *(int(ids[d, 0]) for d in range(chain)))
    assert tree.parents[: chain + 1] == tuple(range(-1, chain))


@FEW
@given(seed=st.integers(0, 2**31), budget=st.integers(0, 20), prefix=st.integers(0, 7), pad=st.integers(0, 5))
def test_attention_mask_is_ancestors_only(seed, budget, prefix, pad):
    rng = np.random.default_rng(seed)
    lp, ids = _random_logprobs(rng, 4, 3)
    tree = build_ddtree(9, lp, ids, budget).padded(budget + 1 + pad)
    m = tree.attention_mask(prefix)
    assert m.shape == (tree.size, prefix + tree.size) and m.dtype == torch.bool
    assert m[:, :prefix].all()
    for i in range(tree.size):
        anc = set(tree.path_to(i))
        assert {j for j in range(tree.size) if m[i, prefix + j]} == anc
    assert tree.positions(prefix).tolist() == [prefix + d for d in tree.depths]
    # padding nodes are nobody's children: the acceptance walk cannot reach them
    reach = {c for ch in tree.children() for c in ch.values()}
    assert all(c < tree.n_real for c in reach)


def test_trie_merges_branches_under_the_budget():
    t = trie_tree(1, [[2, 3, 4], [2, 3, 5], [6]], budget=10)
    assert t.tokens == (1, 2, 3, 4, 5, 6) and t.parents == (-1, 0, 1, 2, 2, 0)
    t = trie_tree(1, [[2, 3, 4], [2, 3, 5], [6]], budget=3)
    assert t.tokens == (1, 2, 3, 4)
    assert chain_tree(1, [4, 5]).parents == (-1, 0, 1)
    with pytest.raises(ValueError):
        DraftTree((1, 2), (-1, 1), (0, 1), 2)  # a node cannot be its own parent


def test_tree_verify_logits_equal_each_paths_causal_logits(tiny):
    llm = tiny["llm"]
    model, kv = llm.plan.model, llm.plan.kv
    rng = np.random.default_rng(3)
    prefix = [int(x) for x in rng.integers(3, 300, size=9)]
    lp, ids = _random_logprobs(rng, 4, 3)
    ids = ids % 300
    tree = build_ddtree(prefix[-1], lp, ids, 12).padded(16)
    n = len(prefix) - 1
    model.forward(torch.tensor(prefix[:-1]), 0, kv)
    out = model.forward(torch.tensor(tree.tokens), n, kv, positions=tree.positions(n), mask=tree.attention_mask(n))
    for node in range(tree.n_real):
        path = [tree.tokens[i] for i in tree.path_to(node)]
        ref = model.forward(torch.tensor(prefix[:-1] + path), 0, kv).logits[-1]
        torch.testing.assert_close(out.logits[node], ref, atol=2e-4, rtol=1e-4)
    llm.session.truncate(0)  # the forwards above bypassed the session


# ----------------------------------------------------------------------------- acceptance math
def _chi2_ok(counts: np.ndarray, probs: np.ndarray, n: int) -> bool:
    """Pearson chi-square at alpha = 1e-3 (Wilson-Hilferty quantile), bins with expected < 5 pooled."""
    exp = probs * n
    big = exp >= 5
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if (~big).any():
        obs_b.append(counts[~big].sum())
        exp_b.append(exp[~big].sum())
    obs_b, exp_b = np.array(obs_b, float), np.array(exp_b, float)
    keep = exp_b > 0
    assert obs_b[~keep].sum() == 0, "samples where the target has no mass"
    stat = float(((obs_b[keep] - exp_b[keep]) ** 2 / exp_b[keep]).sum())
    k = max(int(keep.sum()) - 1, 1)
    z = 3.0902
    crit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return stat < crit


@pytest.mark.parametrize("one_hot", [False, True])
def test_speculative_sample_is_distributed_as_the_target(one_hot):
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    q = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.1])
    n = 6000
    counts = np.zeros(5)
    for _ in range(n):
        d = 0 if one_hot else int(torch.multinomial(q, 1, generator=g))
        _, tok = speculative_sample(p, None if one_hot else q, d, g)
        counts[tok] += 1
    assert _chi2_ok(counts, p.numpy(), n)
    # the residual puts no mass where q already over-covers p
    r = residual(p, q)
    assert r[0] == 0 and abs(float(r.sum()) - 1) < 1e-6


def test_sample_among_candidates_is_distributed_as_the_target():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.3, 0.05, 0.4, 0.15, 0.1])
    n = 6000
    counts = np.zeros(5)
    for _ in range(n):
        _, tok = sample_among(p, [2, 0, 4], g)
        counts[tok] += 1
    assert _chi2_ok(counts, p.numpy(), n)


def test_a_wrong_rejection_rule_fails_the_statistical_check():
    # guard for the test itself: drawing from p (not the residual) after a rejection is biased
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    q = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.1])
    n = 6000
    counts = np.zeros(5)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        accept = float(torch.rand((), generator=g)) < min(1.0, float(p[d] / q[d]))
        tok = d if accept else int(torch.multinomial(p, 1, generator=g))
        counts[tok] += 1
    assert not _chi2_ok(counts, p.numpy(), n)


def test_accept_chain_greedy_takes_the_matching_prefix_and_the_bonus():
    V = 10
    logits = torch.full((4, V), -1.0)
    for row, best in enumerate([3, 5, 7, 2]):
        logits[row, best] = 1.0
    g = torch.Generator()
    assert accept_chain(logits, [3, 5, 7], [1], SamplingParams(), g) == (3, 2)
    assert accept_chain(logits, [3, 6, 7], [1], SamplingParams(), g) == (1, 5)
    assert accept_chain(logits, [4, 5, 7], [1], SamplingParams(), g) == (0, 3)
    assert accept_chain(logits, [], [1], SamplingParams(), g) == (0, 3)
    # repetition penalty is applied with the accepted drafts in the history, like plain decoding
    logits2 = torch.zeros(2, V)
    logits2[0, 3], logits2[1, 3], logits2[1, 4] = 2.0, 1.5, 1.0
    assert accept_chain(logits2, [3], [1], SamplingParams(repetition_penalty=2.0), g) == (1, 4)


def test_accept_tree_greedy_walks_the_target_argmax():
    tree = DraftTree((1, 5, 6, 7, 8), (-1, 0, 1, 0, 3), (0, 1, 2, 1, 2), 5)
    V = 10
    logits = torch.zeros(5, V)
    logits[0, 7] = 1  # root -> 7 (node 3, second child)
    logits[3, 8] = 1  # 7 -> 8 (node 4)
    logits[4, 2] = 1  # bonus
    path, bonus = accept_tree(logits, tree, [1], SamplingParams(), torch.Generator())
    assert path == [0, 3, 4] and bonus == 2


# ----------------------------------------------------------------------------- end to end
def _prompt(rng: random.Random, n: int) -> list[int]:
    alphabet = [rng.randrange(3, 300) for _ in range(6)]  # few symbols: n-grams repeat
    return [rng.choice(alphabet) for _ in range(n)]


def _decoder(tiny, name: str, budget: int, tree: bool, static: bool, block: int = 4) -> SpeculativeStepper:
    llm = tiny["llm"]
    path = tiny["draft"] if name == "draft-model" else tiny["dflash"][block] if name == "dflash" else None
    opts = DrafterOptions(draft_model=path, tree_topk=3)
    d = make_drafter(name, llm.plan, opts)
    return stepper_for(llm.plan, llm.session, d, budget=budget, tree=tree, static_shapes=static, options=opts)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), name=st.sampled_from(["prompt-lookup", "draft-model", "dflash"]),
       budget=st.integers(1, 7), tree=st.booleans(), static=st.booleans(), block=st.sampled_from([2, 4, 8]),
       n_prompt=st.integers(1, 14), max_tokens=st.integers(0, 30), penalty=st.sampled_from([1.0, 1.3]))
def test_greedy_output_equals_the_target_alone(tiny, seed, name, budget, tree, static, block, n_prompt, max_tokens,
                                               penalty):
    llm = tiny["llm"]
    prompt = _prompt(random.Random(seed), n_prompt)
    params = SamplingParams(repetition_penalty=penalty)
    ref_stats, spec_stats = Stats(), Stats()
    ref = list(generate(PlainStepper(llm.session), prompt, max_tokens, Sampler(params), frozenset(), ref_stats))
    dec = _decoder(tiny, name, budget, tree, static, block)
    out = list(generate(dec, prompt, max_tokens, Sampler(params), frozenset(), spec_stats))
    assert out == ref
    assert spec_stats.finish_reason == ref_stats.finish_reason
    assert spec_stats.generated_tokens == len(out)
    s = dec.stats
    # the first token comes from the prefill's logits, as in plain decoding; steps emit the rest
    assert s.emitted == s.accepted + s.steps and s.emitted >= len(out) - 1
    # the session really holds what it says (a later plain generation reuses it correctly)
    again = list(generate(PlainStepper(llm.session), prompt, max_tokens, Sampler(params)))
    assert again == ref


def test_stop_and_context_limits_match_plain_decoding(tiny):
    llm = tiny["llm"]
    prompt = _prompt(random.Random(5), 10)
    ref = list(generate(PlainStepper(llm.session), prompt, 20, Sampler(SamplingParams())))
    stop = frozenset({ref[7]})
    for tree in (False, True):
        for max_tokens in (20, 500):  # 500 runs into the context (96)
            a, b = Stats(), Stats()
            want = list(generate(PlainStepper(llm.session), prompt, max_tokens, Sampler(SamplingParams()), stop, a))
            dec = _decoder(tiny, "draft-model", 5, tree, False)
            got = list(generate(dec, prompt, max_tokens, Sampler(SamplingParams()), stop, b))
            assert got == want and b.finish_reason == a.finish_reason == "stop"
            a, b = Stats(), Stats()
            want = list(generate(PlainStepper(llm.session), prompt, max_tokens, Sampler(SamplingParams()),
                                 frozenset(), a))
            dec = _decoder(tiny, "draft-model", 5, tree, True)
            got = list(generate(dec, prompt, max_tokens, Sampler(SamplingParams()), frozenset(), b))
            assert got == want and b.finish_reason == a.finish_reason
    assert a.finish_reason == "context" and len(got) == 96 - len(prompt)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
@pytest.mark.parametrize("store_moves", [True, False])
def test_off_chain_acceptance_moves_kv_exactly(tiny, kv, store_moves):
    # head_dim 32: q8_0 stores K/V in blocks of 32
    path = fixtures.write_tiny(tiny["dir"] / "target_hd32.gguf", seed=0, n_heads=2, n_kv_heads=1)
    llm = fixtures.load(path, ctx=96, kv_k=kv, kv_v=kv)
    if not store_moves:  # a store without move(): read/write round trip or re-run
        llm.session.kv.move = None
    prompt = _prompt(random.Random(11), 8)
    ref = list(generate(PlainStepper(llm.session), prompt, 24, Sampler(SamplingParams())))
    # depth 3, two candidates per depth, budget 14: the whole tree, so the true path is in it
    dec = SpeculativeStepper(llm.session, fixtures.SecondBest(ref, len(prompt), 300), budget=14, tree=True,
                             options=DrafterOptions(tree_topk=2))
    out = list(generate(dec, prompt, 24, Sampler(SamplingParams())))
    assert out == ref
    s = dec.stats
    assert s.accepted > s.steps  # paths of length >= 2 were accepted ...
    assert s.moved_steps >= s.steps - 1  # ... off the depth-first chain, so the K/V moved
    # move() copies bytes; without it: exact read/write for f16, re-run for quantized K/V
    assert (s.reforward_steps > 0) == (not store_moves and kv == "q8_0")


class FixedChain:
    """Test drafter: always proposes the same stochastic chain from fixed distributions."""

    name = "fixed"
    capture: tuple[int, ...] = ()
    supports_tree = False

    def __init__(self, q: torch.Tensor):
        self.q = q

    def propose(self, tokens, budget, *, request=None):
        toks = torch.multinomial(self.q, 1, generator=request.generator)[:, 0]
        return Proposal(tokens=tuple(toks.tolist()), probs=self.q)


def _sampling_setup(llm, tree: bool) -> tuple[list[int], SamplingParams, np.ndarray, list[int]]:
    """A prompt whose prompt-lookup drafts have target probability strictly between 0 and 1, a
    temperature spreading the target over several tokens, the target distribution, and the
    drafted first tokens. Searched, so it holds for whatever weights the synthetic model has."""
    model, kv = llm.plan.model, llm.plan.kv

    def dist(prompt: list[int]) -> tuple[SamplingParams, np.ndarray]:
        logits = model.forward(torch.tensor(prompt), 0, kv).logits[-1]
        top = torch.sort(logits, descending=True).values
        params = SamplingParams(temperature=float(top[0] - top[3]) / 1.5 + 1e-3, top_k=12)
        return params, target_distribution(logits, prompt, params).numpy()

    try:
        for x in range(3, 80):
            _, p0 = dist([x])
            cands = [int(t) for t in np.argsort(-p0)[:3] if int(t) != x]
            if tree:
                prompt = [x, cands[1], x, cands[0], x]  # 1-gram continuations of x: cands[0], cands[1]
                drafted = cands[:2]
            else:
                prompt = [x, cands[0], x, cands[0], x]
                drafted = cands[:1]
            params, p = dist(prompt)
            if all(0.05 < p[d] < 0.9 for d in drafted) and (p > 0.03).sum() >= 3:
                return prompt, params, p, drafted
    finally:
        llm.session.truncate(0)  # the forwards above bypassed the session
    pytest.fail("no prompt found whose drafts the target finds plausible")


@pytest.mark.parametrize("kind", ["prompt-lookup-chain", "prompt-lookup-tree", "stochastic-chain"])
def test_first_token_distribution_matches_the_target_at_temperature(tiny, kind):
    llm = tiny["llm"]
    prompt, params, p, drafted = _sampling_setup(llm, tree=kind == "prompt-lookup-tree")
    if kind == "prompt-lookup-chain":
        dec = _decoder(tiny, "prompt-lookup", 3, False, False)
    elif kind == "prompt-lookup-tree":
        opts = DrafterOptions(ngram_max=1)
        dec = SpeculativeStepper(llm.session, make_drafter("prompt-lookup", llm.plan, opts), budget=6, tree=True,
                                 options=opts)
    else:
        q = torch.zeros(2, 300)
        q[:, np.argsort(-p)[:3]] = torch.tensor([0.2, 0.5, 0.3])
        dec = SpeculativeStepper(llm.session, FixedChain(q), budget=2)
    n = 600
    counts = np.zeros(300)
    for i in range(n):
        dec.prefill(prompt[:-1])  # rolls the previous sample's tokens back (prefix reuse)
        toks = dec.step(list(prompt), Sampler(attrs_evolve(params, seed=i)), max_depth=2)
        counts[toks[0]] += 1
    assert dec.stats.steps == n
    s = dec.stats
    assert s.drafted >= n and 0 < s.accepted < s.drafted  # drafts were offered, some accepted, some not
    assert _chi2_ok(counts, p, n), (np.nonzero(counts)[0], counts[counts > 0], p[counts > 0])


def attrs_evolve(params: SamplingParams, **kw) -> SamplingParams:
    import attrs
    return attrs.evolve(params, **kw)


# ----------------------------------------------------------------------------- bad input, stats
def test_bad_budgets_and_forced_drafters_are_clear_errors(tiny):
    llm = tiny["llm"]
    d = make_drafter("prompt-lookup", llm.plan)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ConfigError, match="budget"):
            SpeculativeStepper(llm.session, d, budget=bad)
    with pytest.raises(ConfigError, match="budget"):  # before the draft model (none given here) is looked for
        llm.speculative("draft-model", budget=0)
    with pytest.raises(ConfigError, match="trees"):
        SpeculativeStepper(llm.session, FixedChain(torch.ones(1, 300) / 300), budget=2, tree=True)
    with pytest.raises(SelectionError, match="no-such-drafter"):
        make_drafter("no-such-drafter", llm.plan)
    for name in ("draft-model", "dflash"):
        with pytest.raises(ConfigError, match="--draft-model"):
            make_drafter(name, llm.plan)
    dec = SpeculativeStepper(llm.session, d, budget=2)
    with pytest.raises(ContextOverflowError):
        list(generate(dec, [], 4, Sampler(SamplingParams())))
    with pytest.raises(ContextOverflowError):
        list(generate(dec, [5] * 96, 4, Sampler(SamplingParams())))
    with pytest.raises(ConfigError):
        DrafterOptions(ngram_min=3, ngram_max=2)


@pytest.mark.parametrize("cmd", [["generate", "hi", "--drafter", "prompt-lookup"], ["bench", "--drafter", "prompt-lookup"]])
@pytest.mark.parametrize("bad", ["0", "-2", "x"])
def test_cli_rejects_a_bad_budget_before_loading(cmd, bad, capsys):
    from luce_core.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--model", "/nonexistent.gguf", "--draft-budget", bad])
    assert e.value.code == 2 and "--draft-budget: must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["generate", "hi"], ["bench"]])
def test_cli_rejects_a_tree_without_a_drafter_before_loading(cmd, capsys, monkeypatch):
    from luce_core.cli import main

    monkeypatch.delenv("LUCE_DRAFTER", raising=False)
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--model", "/nonexistent.gguf", "--draft-tree"])
    assert e.value.code == 2 and "--draft-tree verifies a drafter's trees" in capsys.readouterr().err


@pytest.mark.parametrize("tree", [False, True])
def test_draft_model_device_chain_equals_stepwise_drafting(tiny, tree):
    """The draft model's greedy chain (ids kept on the device, Session.greedy) proposes what
    drafting one host-side argmax at a time proposes, with the same log-probs for trees, and
    leaves its session holding the same tokens."""
    from luce_core.session import Session

    llm = tiny["llm"]
    d = make_drafter("draft-model", llm.plan, DrafterOptions(draft_model=tiny["draft"]))
    ref = Session(d.session.model, d.session.kv, d.session.ctx)  # the same model and store, stepped by hand
    prompt = [9, 10, 11, 9, 10, 11, 9, 10, 40]
    for k in (1, 4, 6):
        req = DraftRequest(tokens=prompt, budget=k, tree=tree, params=SamplingParams(), generator=torch.Generator(),
                           max_depth=k, tree_temp=0.7)
        d.session.truncate(0)
        prop = d.propose(prompt, k, request=req)
        got_tokens = list(d.session.tokens)
        ref.truncate(0)
        logits, _ = ref.prefill(prompt)
        drafts, lps = [], []
        for i in range(k):
            lps.append(torch.log_softmax(logits.float() / 0.7, dim=-1))
            drafts.append(int(torch.argmax(logits)))
            if i + 1 < k:
                logits = ref.step(drafts[-1])
        assert list(prop.tokens) == drafts and got_tokens == ref.tokens == prompt + drafts[:-1]
        if tree:
            torch.testing.assert_close(prop.logprobs, torch.stack(lps), rtol=0, atol=1e-5)
        else:
            assert prop.logprobs is None and prop.probs is None


def test_stats_are_consistent_and_json_ready(tiny):
    prompt = [9, 10, 11, 9, 10, 11, 9, 10]
    dec = _decoder(tiny, "draft-model", 4, False, False)
    out = list(generate(dec, prompt, 25, Sampler(SamplingParams())))
    s = dec.stats
    d = json.loads(json.dumps(s.as_dict()))
    assert d["steps"] == s.steps > 0 and d["emitted"] == s.accepted + s.steps >= len(out) - 1  # 1st: prefill
    assert d["acceptance_length"] == pytest.approx(s.accepted / s.steps + 1, abs=1e-4)
    assert len(d["acceptance_rate_at"]) == 4 and all(0 <= r <= 1 for r in d["acceptance_rate_at"])
    assert sum(s.accepted_at) == s.accepted and s.offered_at[0] <= s.steps
    assert s.draft_s > 0 and s.verify_s > 0
    empty = SpecStats()
    assert empty.acceptance_length == 0.0 and empty.as_dict()["draft_fraction"] == 0.0


def test_stepper_for_builds_the_mirror_through_the_plan(tiny, monkeypatch):
    """The wiring the API/CLI use: the feature mirror comes from the plan's kv_storage; a stepper
    for a drafter that reads features, given no mirror, is refused."""
    llm = tiny["llm"]
    chosen, made = llm.plan.chosen["kv_storage"], []

    class Recording:  # the plan's kv_storage implementation, counting the storages it creates
        def create(self, caps, config):
            made.append(chosen.create(caps, config))
            return made[-1]

    monkeypatch.setitem(llm.plan.chosen, "kv_storage", Recording())
    prompt = _prompt(random.Random(2), 9)
    ref = list(generate(PlainStepper(llm.session), prompt, 20, Sampler(SamplingParams())))
    opts = DrafterOptions(draft_model=tiny["dflash"][4])
    d = make_drafter("dflash", llm.plan, opts)
    with pytest.raises(ConfigError, match="feature mirror"):
        SpeculativeStepper(llm.session, d, budget=3)
    dec = stepper_for(llm.plan, llm.session, d, budget=3, tree=True, options=opts)
    assert dec.mirror is not None and dec.mirror.dtype == llm.plan.config.feature_dtype
    assert dec.mirror.width == len(dec.capture) * llm.plan.model.cfg.hidden
    assert len(made) == 1  # the mirror's store came from the plan's kv_storage
    assert list(generate(dec, prompt, 20, Sampler(SamplingParams()))) == ref
    assert dec.mirror.length == len(llm.session.tokens)  # one feature row per committed token

"""GPU: one-graph decode gives the same greedy tokens as eager decode (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import luce

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kv", [("f16", "f16"), ("q8_0", "q4_0")])
def test_graph_decode_matches_eager(smollm2_path, kv) -> None:
    prompt = "The capital of France is"
    graphs = luce.load(smollm2_path, device="cuda", ctx=1024, kv_k=kv[0], kv_v=kv[1], progress=False)
    assert graphs.session.graphs is not None
    eager = luce.load(smollm2_path, device="cuda", ctx=1024, kv_k=kv[0], kv_v=kv[1], cuda_graphs=False,
                      progress=False)
    a = list(graphs.generate_ids(prompt, 300))  # crosses the 256-slot window boundary
    b = list(eager.generate_ids(prompt, 300))
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert n >= min(len(a), len(b), 32), f"first divergence at token {n}"


def test_cuda_backend_greedy_matches_torch_reference(smollm2_path) -> None:
    """The first 32 greedy tokens of the CUDA path equal the f32 torch reference's, or the first
    divergence is a near-tie in the reference's own logits (bf16 rounding can flip those)."""
    import torch

    prompt = "The capital of France is"
    gpu = luce.load(smollm2_path, device="cuda", progress=False)
    ref = luce.load(smollm2_path, device="cpu", dtype="f32", progress=False)
    a = list(gpu.generate_ids(prompt, 32))
    b = list(ref.generate_ids(prompt, 32))
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    print(f"\ncuda selected {gpu.selected()}; first divergence: {n}")
    if n is None:
        assert a == b
        return
    # logits of the reference at the divergence point: how close were the two candidates?
    ids = ref.encode(prompt) + b[:n]
    ref.session.truncate(0)
    logits, _ = ref.session.prefill(ids)
    margin = float(logits[b[n]] - logits[a[n]])
    print(f"divergence at token {n}: reference {b[n]} vs cuda {a[n]}, reference logit margin {margin:.4f}")
    assert margin < 0.25, f"divergence at token {n} is not a near-tie (margin {margin:.3f})"


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_fused_norm_and_residual_change_no_logit(smollm2_path, dtype) -> None:
    """The GEMVs' fused RMSNorm, residual add, RoPE + KV append (QKV epilogue) and f32 logits
    give the logits and cache bytes of the unfused kernels (an rms_norm launch before each
    projection, an add after O and down, the append kernel, a cast) bit for bit: a prefill chunk
    (GEMM path), a decode step and a verify-sized step."""
    from luce_core.layer_ops import TorchLayerOps
    from luce_cuda.layer_ops import CudaLayerOps

    class Unfused(CudaLayerOps):
        norm_linear = TorchLayerOps.norm_linear  # the CUDA rms_norm kernel, then the projection
        linear_residual = TorchLayerOps.linear_residual  # the projection, then an add in torch
        qkv_rope_store = TorchLayerOps.qkv_rope_store  # the QKV GEMV, then the append kernel

    llm = luce.load(smollm2_path, device="cuda", dtype=dtype, ctx=512, cuda_graphs=False, progress=False)
    model, kv = llm.session.model, llm.session.kv
    ids = torch.tensor(llm.encode("The capital of France is Paris. The capital of Spain is") * 5, device="cuda")
    assert len(ids) >= 46

    def run(ops) -> list[torch.Tensor]:
        model.ops = ops
        kv.set_length(0)
        kv.k.zero_()
        kv.v.zero_()
        return [model.forward(ids[:40], 0, kv).logits, model.forward(ids[40:41], 40, kv).logits,
                model.forward(ids[41:46], 41, kv).logits, kv.k.clone(), kv.v.clone()]

    fused, unfused = run(CudaLayerOps()), run(Unfused())
    for f, u in zip(fused, unfused):
        assert torch.isfinite(f).all()
        assert torch.equal(f, u), f"max diff {(f - u).abs().max()}"


def test_graphed_speculative_chain_equals_plain_greedy(smollm2_path) -> None:
    """Prompt-lookup chain verify replayed as CUDA graphs keeps the target's greedy tokens (f32,
    where batched and single-row rounding agree) and actually accepts drafts."""
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add("
    llm = luce.load(smollm2_path, device="cuda", dtype="f32", ctx=1024, progress=False)
    plain = list(llm.generate_ids(prompt, 96))
    spec = list(llm.generate_ids(prompt, 96, drafter="prompt-lookup", draft_budget=8))
    assert spec == plain
    assert llm.last_spec_stats.acceptance_length > 1.5
    assert any(n > 1 for _, n, _, _ in llm.session.graphs.graphs)  # the verify ran as a captured graph


def test_graphed_dflash_is_lossless_and_matches_eager_drafting(smollm2_path, tmp_path) -> None:
    """DFlash with the feature-capturing verify and the drafting step both replayed as CUDA
    graphs keeps the target's greedy tokens (f32), and the graphed drafting step's logits equal
    the eager step's."""
    from drafting_fixtures import random_dflash

    prompt = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef"
    llm = luce.load(smollm2_path, device="cuda", dtype="f32", ctx=1024, progress=False)
    path = random_dflash(llm.plan.model, tmp_path / "d.safetensors", block=8, window=64)
    plain = list(llm.generate_ids(prompt, 96))
    spec = list(llm.generate_ids(prompt, 96, drafter="dflash", draft_model=path, draft_budget=7))
    assert spec == plain
    dec = llm._spec
    assert any(key[2] for key in llm.session.graphs.graphs)  # a verify graph that captures features
    d = dec.drafter
    assert d._graph is not None and d._graph.graphs  # the drafting step replayed as a graph
    s = llm.session
    n = len(s.tokens)
    toks = s.tokens[:n] + [5]
    d.use_graphs = False
    d.truncate(0)
    eager = d.block_logits(toks, dec.mirror).clone()
    d.use_graphs = True
    d.truncate(n - 3)
    graphed = d.block_logits(toks, dec.mirror).clone()
    torch.testing.assert_close(graphed, eager, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kv, graphed", [(("f16", "f16"), True), (("bf16", "bf16"), True), (("q8_0", "q4_0"), True),
                                         (("f16", "f16"), False)])
def test_tree_verify_is_lossless_in_bf16(smollm2_path, kv, graphed) -> None:
    """DDTree on the CUDA backend in bf16 gives the target's greedy tokens: the tree's rows run the
    decode kernels (no reference fallback), as a CUDA graph or eagerly, and every accepted path
    leaves the depth-first chain, so its K/V move (byte copy) before the next step."""
    import warnings

    from luce_core.contract.drafting import DrafterOptions
    from luce_core.generate import PlainStepper, generate
    from luce_core.sampling import Sampler, SamplingParams
    from luce_core.speculative.stepper import SpeculativeStepper
    from drafting_fixtures import SecondBest

    llm = luce.load(smollm2_path, device="cuda", ctx=1024, kv_k=kv[0], kv_v=kv[1], progress=False)
    assert llm.session.model.dtype == torch.bfloat16
    prompt = llm.encode("Write a short story about a robot who learns to paint.")
    ref = list(generate(PlainStepper(llm.session), prompt, 80, Sampler(SamplingParams())))
    dec = SpeculativeStepper(llm.session, SecondBest(ref, len(prompt), llm.plan.model.cfg.vocab, depth=4),
                             budget=14, tree=True, static_shapes=graphed, options=DrafterOptions(tree_topk=2))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="luce_cuda attention")  # a fallback fails the test
        out = list(generate(dec, prompt, 80, Sampler(SamplingParams())))
    assert out == ref
    s = dec.stats
    assert s.accepted > 2 * s.steps and s.moved_steps >= s.steps - 1 and s.reforward_steps == 0
    assert any(key[3] for key in llm.session.graphs.graphs) == graphed  # tree verify graphs


@pytest.mark.parametrize("drafter", ["prompt-lookup", "dflash"])
def test_ddtree_is_lossless_in_bf16(smollm2_path, tmp_path, drafter) -> None:
    """luce's own drafters in tree mode (graphed verify; DFlash's also captures features) keep
    plain greedy decoding's tokens in bf16 on code and chat prompts."""
    from drafting_fixtures import random_dflash

    llm = luce.load(smollm2_path, device="cuda", ctx=1024, progress=False)
    path = random_dflash(llm.plan.model, tmp_path / "d.safetensors", block=8) if drafter == "dflash" else None
    prompts = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(",
               llm.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors of the rainbow."}])]
    for prompt in prompts:
        # each from an empty cache: a reused prompt re-runs only its last token, and in bf16 a
        # one-row step does not round like the chat prompt's 37-row prefill did
        llm.session.truncate(0)
        plain = list(llm.generate_ids(prompt, 96))
        llm.session.truncate(0)
        spec = list(llm.generate_ids(prompt, 96, drafter=drafter, draft_model=path, draft_budget=12,
                                     draft_tree=True))
        assert spec == plain
        if drafter == "prompt-lookup" and prompt is prompts[0]:  # repetitive: most drafts hold
            assert llm.last_spec_stats.acceptance_length > 1.5
    assert any(key[3] for key in llm.session.graphs.graphs)


def test_draft_model_catches_up_through_graphs(smollm2_path) -> None:
    """The draft-model drafter on CUDA (SmolLM2 drafting for itself): outputs equal plain greedy
    decoding, almost every draft is accepted, and the draft session's catch-up on the accepted
    tokens replays CUDA graphs of several tokens instead of eager forwards."""
    llm = luce.load(smollm2_path, device="cuda", ctx=1024, progress=False)
    prompt = llm.encode("Write a short story about a robot who learns to paint.")
    llm.session.truncate(0)
    plain = list(llm.generate_ids(prompt, 64, stop_ids=()))
    llm.session.truncate(0)
    spec = list(llm.generate_ids(prompt, 64, stop_ids=(), drafter="draft-model", draft_model=str(smollm2_path),
                                 draft_budget=4))
    assert len(plain) == 64 and spec == plain
    assert llm.last_spec_stats.acceptance_length > 4.0  # its own draft: everything but near-ties holds
    draft = llm._spec.drafter.session
    assert any(n > 1 for _, n, _, _ in draft.graphs.graphs)
    assert draft.graphs.greedy_graphs  # and its chains of drafts replayed as single graphs


def test_greedy_chain_graph_equals_graphed_steps(smollm2_path) -> None:
    """Session.greedy through one graph replay (ids fed back on the device) drafts what one-token
    graph steps with a host argmax between them draft, from logits that agree."""
    llm = luce.load(smollm2_path, device="cuda", ctx=1024, progress=False)
    s = llm.session
    prompt = llm.encode("The three primary colors are")
    logits, _ = s.prefill(prompt)
    ids, rows = s.greedy(logits.clone(), 8)
    assert s.tokens == prompt + ids[:7] and rows.shape == (8, llm.config.vocab)
    assert list(s.graphs.greedy_graphs) == [(256, 7)]
    s.truncate(0)
    logits, _ = s.prefill(prompt)
    ref, ref_rows = [], []
    for i in range(8):
        ref_rows.append(logits.float().clone())
        ref.append(int(torch.argmax(logits)))
        if i < 7:
            logits = s.step(ref[-1])
    assert ids == ref
    torch.testing.assert_close(rows, torch.stack(ref_rows), rtol=0, atol=0.05)


WORDS = ("the", "cat", "sat", "on", "mat", "a", "red", "ball", "def", "return", "x", "=", "1", "+", "(", ")", ":",
         "\n", "print", "hello", "world", ".", "Write", "poem", "list", "three")


@pytest.fixture(scope="module")
def cuda_spec(smollm2_path, tmp_path_factory):
    """SmolLM2 on CUDA (bf16, graphs) and drafters that accept much (itself as draft model),
    from n-grams (prompt lookup) or little (untrained DFlash, blocks 4 and 8)."""
    from luce_core.contract.drafting import DrafterOptions
    from luce_core.speculative.wiring import make_drafter
    from drafting_fixtures import random_dflash

    llm = luce.load(smollm2_path, device="cuda", ctx=1024, progress=False)
    d = tmp_path_factory.mktemp("cuda_spec")
    files = {("dflash", b): random_dflash(llm.plan.model, d / f"d{b}.safetensors", block=b, seed=b) for b in (4, 8)}
    files[("draft-model", "self")] = str(smollm2_path)
    drafters = {k: make_drafter(k[0], llm.plan, DrafterOptions(draft_model=p)) for k, p in files.items()}
    drafters[("prompt-lookup", None)] = make_drafter("prompt-lookup", llm.plan)
    return llm, drafters


@settings(max_examples=40, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=2, max_size=30), chat=st.booleans(),
       drafter=st.sampled_from([("prompt-lookup", None), ("draft-model", "self"), ("dflash", 4), ("dflash", 8)]),
       budget=st.integers(1, 7), tree=st.booleans(), max_tokens=st.integers(8, 48))
def test_cuda_speculative_greedy_property(cuda_spec, words, chat, drafter, budget, tree, max_tokens) -> None:
    """Random prompts, drafters, budgets, block sizes, chain or tree, on the CUDA backend in bf16
    with graphed verifies: the speculative output is plain greedy decoding's, token for token."""
    from luce_core.contract.drafting import DrafterOptions
    from luce_core.generate import PlainStepper, generate
    from luce_core.sampling import Sampler, SamplingParams
    from luce_core.speculative.wiring import stepper_for

    llm, drafters = cuda_spec
    text = " ".join(words)
    ids = llm.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": text}]) if chat else text)
    llm.session.truncate(0)  # each from an empty cache (see test_ddtree_is_lossless_in_bf16)
    ref = list(generate(PlainStepper(llm.session), ids, max_tokens, Sampler(SamplingParams()), frozenset()))
    llm.session.truncate(0)
    dec = stepper_for(llm.plan, llm.session, drafters[drafter], budget=budget, tree=tree,
                      options=DrafterOptions(tree_topk=3))
    out = list(generate(dec, ids, max_tokens, Sampler(SamplingParams()), frozenset()))
    assert out == ref, (drafter, budget, tree, llm.tokenizer.decode(out), llm.tokenizer.decode(ref))
    if drafter == ("draft-model", "self"):
        assert dec.stats.accepted > 0

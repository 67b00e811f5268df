"""luce's transformer graph against Hugging Face transformers (the external oracle).

Real model: SmolLM2-135M-Instruct Q4_1, with HF built by transformers' own GGUF conversion, so
both sides hold bit-identical dequantized weights and only the graph arithmetic differs.
Synthetic models: F32 llama / qwen2 / qwen3 GGUFs with random weights written by
``luce_tools.models.synth``, HF built from the same hyper-parameters and the returned weights.

Measured on the CPU reference (f32 compute, f32 KV; numbers printed with ``pytest -s``):
SmolLM2 over 35 tokens: max-abs 6.4e-5 on logits of std ~7 (rel 8.8e-6), mean KL 1.0e-11,
decode-vs-prefill max-abs 9.7e-5; synthetic (9 shapes): max-abs 4.8e-7..7.7e-7 (rel ~2e-6), KL
<= 1.3e-14, decode-vs-prefill max-abs <= 9e-7. The tolerances below sit ~5-15x above the
max-abs values (BLAS blocking differs between CPUs) and far below what a graph bug costs: a
wrong RoPE base, RMS epsilon or a lost KV position moves the synthetic logits by 0.17-0.8
(``test_synthetic_oracle_is_sensitive``).
"""
from __future__ import annotations

import numpy as np
import pytest

import luce
from hf_oracle import Agreement, compare, hf_from_gguf, hf_from_weights, hf_logits, luce_logits, luce_stepwise_logits

F32 = dict(device="cpu", dtype="f32", kv_k="f32", kv_v="f32", progress=False)
PROMPT = ("The quick brown fox jumps over the lazy dog. In 1889 the Eiffel Tower opened in Paris, "
          "and visitors climbed its 1,665 steps")

# SmolLM2: 30 layers of f32 arithmetic in a different order (fused SDPA vs eager, adjacent-pair vs
# half RoPE on permuted rows) over logits of magnitude ~20.
SMOL_MAX_ABS = 5e-4
SMOL_KL = 1e-9
# Synthetic: 2 layers, logits of magnitude ~1.
SYN_MAX_ABS = 1e-5
SYN_KL = 1e-12
# decode (T=1 rows, growing KV) vs one prefill forward: same math, different matmul shapes
STEP_MAX_ABS_SMOL = 5e-4
STEP_MAX_ABS_SYN = 1e-5


def report(label: str, a: Agreement) -> None:
    print(f"\n[oracle] {label}: {a}")


# ----------------------------------------------------------------------------- SmolLM2 (real)
@pytest.fixture(scope="module")
def smol(smollm2_path):
    llm = luce.load(smollm2_path, **F32)
    ids = llm.encode(PROMPT)
    assert 25 <= len(ids) <= 40, len(ids)
    return llm, ids


@pytest.fixture(scope="module")
def smol_hf_logits(smollm2_path, smol):
    _, ids = smol
    return hf_logits(hf_from_gguf(smollm2_path), ids)


def test_smollm2_logits_match_hf(smol, smol_hf_logits):
    llm, ids = smol
    assert llm.selected()["linear"] and llm.plan.dtype == "f32"
    got = luce_logits(llm, ids)
    assert got.shape == smol_hf_logits.shape == (len(ids), llm.config.vocab)
    a = compare(smol_hf_logits, got)
    report(f"SmolLM2 Q4_1 f32, {len(ids)} tokens, selected {llm.selected()}", a)
    assert a.max_abs < SMOL_MAX_ABS, a
    assert a.kl_mean < SMOL_KL and a.kl_max < 10 * SMOL_KL, a
    assert a.argmax_agree == 1.0, a


def test_smollm2_decode_equals_prefill(smol, smol_hf_logits):
    """Stepping token by token through the KV store reproduces every prefill row (and HF)."""
    llm, ids = smol
    prefill = 5
    stepped = luce_stepwise_logits(llm, ids, prefill=prefill)
    batch = luce_logits(llm, ids)[prefill - 1:]
    a = compare(batch, stepped)
    report("SmolLM2 decode-vs-prefill", a)
    assert a.max_abs < STEP_MAX_ABS_SMOL and a.argmax_agree == 1.0, a
    assert compare(smol_hf_logits[prefill - 1:], stepped).max_abs < SMOL_MAX_ABS


def test_smollm2_prefill_last_row_only(smol, smol_hf_logits):
    """The engine's prefill (LM head on the last row only) gives HF's last-position logits."""
    llm, ids = smol
    llm.session.truncate(0)
    last, reused = llm.session.prefill(ids)
    llm.session.truncate(0)
    assert reused == 0 and last.shape == (llm.config.vocab,)
    assert compare(smol_hf_logits[-1:], last[None].cpu()).max_abs < SMOL_MAX_ABS


# ----------------------------------------------------------------------------- synthetic
# (arch, hidden, n_heads, n_kv_heads, head_dim, tied): head_dim 64 and 128, GQA 1 / 3 / 8, tied and
# untied, q width equal to and different from hidden (qwen3 decouples head_dim from hidden).
CASES = [
    ("llama", 256, 4, 4, 64, True),
    ("llama", 192, 3, 1, 64, False),
    ("llama", 256, 8, 1, 128, True),
    ("qwen2", 256, 2, 2, 128, False),
    ("qwen2", 192, 3, 1, 64, True),
    ("qwen2", 256, 4, 4, 64, False),
    ("qwen3", 256, 8, 1, 128, False),
    ("qwen3", 128, 3, 1, 64, True),
    ("qwen3", 256, 4, 4, 64, True),
]
N_LAYERS, FFN, VOCAB, CTX = 2, 384, 512, 256
ROPE_BASE, RMS_EPS = 50000.0, 1e-6  # not the readers' defaults: a dropped key shows up


def _case_id(c) -> str:
    arch, hidden, nh, nkv, hd, tied = c
    return f"{arch}-h{hidden}-{nh}x{nkv}-hd{hd}-{'tied' if tied else 'untied'}"


def _build(tmp_path_factory, case, seed: int):
    from luce_tools.models.synth import write_synthetic_gguf

    arch, hidden, nh, nkv, hd, tied = case
    shape = dict(hidden=hidden, n_layers=N_LAYERS, n_heads=nh, n_kv_heads=nkv, head_dim=hd, ffn=FFN)
    path = tmp_path_factory.mktemp("synth") / f"{_case_id(case)}.gguf"
    # outlier K channels (as in real models) make attention peaky, so RoPE and masking errors show
    weights = write_synthetic_gguf(path, arch=arch, vocab=VOCAB, tied=tied, qtype="F32", seed=seed,
                                   ctx=CTX, rope_base=ROPE_BASE, rms_eps=RMS_EPS, outlier_channels=4, **shape)
    hp = dict(shape, vocab=VOCAB, tied=tied, rope_base=ROPE_BASE, rms_eps=RMS_EPS, ctx=CTX)
    return path, weights, hp


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_synthetic_matches_hf(tmp_path_factory, case):
    arch = case[0]
    path, weights, hp = _build(tmp_path_factory, case, seed=CASES.index(case))
    llm = luce.load(path, **F32)
    assert llm.config.arch == arch and llm.config.tied_embeddings == hp["tied"]
    ids = np.random.default_rng(7).integers(0, VOCAB, size=40).tolist()

    want = hf_logits(hf_from_weights(arch, weights, **hp), ids)
    got = luce_logits(llm, ids)
    a = compare(want, got)
    report(f"synthetic {_case_id(case)} prefill", a)
    assert a.max_abs < SYN_MAX_ABS and a.kl_mean < SYN_KL, a
    assert a.argmax_agree == 1.0, a

    stepped = luce_stepwise_logits(llm, ids, prefill=1)
    s = compare(got, stepped)
    report(f"synthetic {_case_id(case)} decode-vs-prefill", s)
    assert s.max_abs < STEP_MAX_ABS_SYN and s.argmax_agree == 1.0, s


def test_synthetic_oracle_is_sensitive(tmp_path_factory):
    """The tolerances above are far below what real graph mistakes cost on these tiny models."""
    case = ("qwen3", 128, 3, 1, 64, True)
    path, weights, hp = _build(tmp_path_factory, case, seed=99)
    ids = np.random.default_rng(8).integers(0, VOCAB, size=40).tolist()
    got = luce_logits(luce.load(path, **F32), ids)
    assert compare(hf_logits(hf_from_weights("qwen3", weights, **hp), ids), got).max_abs < SYN_MAX_ABS
    mutants = {
        "rope base x10": dict(hp, rope_base=hp["rope_base"] * 10),
        "rms eps 1e-2": dict(hp, rms_eps=1e-2),
    }
    for name, bad in mutants.items():
        d = compare(hf_logits(hf_from_weights("qwen3", weights, **bad), ids), got)
        print(f"\n[oracle] mutant {name}: {d}")
        assert d.max_abs > 20 * SYN_MAX_ABS, (name, d)
    # K/V of one position dropped (a masking/offset error): compare the shifted sequence
    shifted = hf_logits(hf_from_weights("qwen3", weights, **hp), ids[1:])
    d = compare(shifted[-5:], got[-5:])
    print(f"\n[oracle] mutant first token dropped: {d}")
    assert d.max_abs > 20 * SYN_MAX_ABS, d

"""Spec of the ``loader`` role on synthetic GGUFs: the model config, every tensor (name, shape,
stored bytes and values), a working tokenizer, and a LuceError (never a crash) on damaged files."""
from __future__ import annotations

import os
import tempfile

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from luce_core.plugin_api import LuceError
from luce_core.formats.blocks import row_bytes
from luce_specs.hyp import spec_settings
from luce_specs.oracles import reference_weight

LUCE_ROLE = "loader"
LUCE_REASONS_AT_COLLECTION = False  # a loader claims a file; the files are written by the tests
SETTINGS = spec_settings(10)

# HF name pieces -> GGUF names (llama.cpp's tensor naming)
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in _TOP:
        return _TOP[hf]
    _, _, i, rest = hf.split(".", 3)  # model.layers.<i>.<rest>
    return f"blk.{i}.{_LAYER[rest]}"


@attrs.frozen
class Shape:
    arch: str
    qtype: str
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    seed: int


def _heads(block: int) -> list[tuple[int, int, int]]:
    """(n_heads, n_kv_heads, head_dim) whose q/kv widths are whole blocks (attn_output's rows)."""
    return [(h, kv, d) for kv in (1, 2) for h in (kv, 2 * kv, 3 * kv, 4 * kv) for d in (32, 64)
            if (h * d) % block == 0 and (kv * d) % min(block, 64) == 0 and h * d <= 256]


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    qtype = draw(st.sampled_from(["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "NVFP4"]))
    block = 256 if qtype in ("Q4_K", "Q6_K") else 64
    n_heads, n_kv, head_dim = draw(st.sampled_from(_heads(block)))
    return Shape(arch=draw(st.sampled_from(["llama", "qwen2", "qwen3"])), qtype=qtype,
                 hidden=block * draw(st.integers(1, 2)), n_layers=draw(st.integers(1, 2)),
                 n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                 ffn=block * draw(st.integers(1, 2)), vocab=draw(st.integers(260, 300)),
                 tied=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


def _write(path: str, s: Shape) -> dict:
    from luce_tools.models.synth import write_synthetic_gguf

    kw = attrs.asdict(s)
    return write_synthetic_gguf(path, **kw)


def _load(subject, path: str):
    config = attrs.evolve(subject.config, model_path=path)
    reasons = subject.reasons(config)
    if reasons:  # this loader reads another format: correct, and reported as such
        pytest.skip(f"loader {subject.impl.name!r} does not claim a GGUF: {'; '.join(reasons)}")
    return subject.create(config).load(path, config)


def _expected_stored(hf_name: str, values, s: Shape) -> torch.Tensor:
    """What the file holds for an HF weight: llama Q/K rows in GGUF's pairwise-RoPE order."""
    from luce_tools.models.synth import llama_permute

    if s.arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        values = llama_permute(values, s.n_heads if "q_proj" in hf_name else s.n_kv_heads)
    return torch.from_numpy(values).double()


@SETTINGS
@given(s=shapes())
def test_loads_config_and_every_tensor(subject, s: Shape) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.gguf")
        hf = _write(path, s)
        loaded = _load(subject, path)
        c = loaded.config
        assert (c.arch, c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab) == \
            (s.arch, s.hidden, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn, s.vocab)
        assert c.tied_embeddings == s.tied
        assert (c.qkv_bias, c.qk_norm) == (s.arch == "qwen2", s.arch == "qwen3")
        assert c.rope_style == ("normal" if s.arch == "llama" else "neox")
        expected = {gguf_name(n): n for n in hf if not (s.tied and n == "lm_head.weight")}
        assert set(expected) <= set(loaded.tensors), f"missing {sorted(set(expected) - set(loaded.tensors))}"
        for name, hf_name in expected.items():
            t = loaded.tensors[name]
            assert t.shape == tuple(hf[hf_name].shape), name
            rows = 1
            for d in t.shape[:-1]:
                rows *= d
            assert t.data.dtype.name == "uint8" and t.data.shape == (rows, row_bytes(t.qtype, t.shape[-1])), name
            # exact, except NVFP4's per-tensor scale product (float32 in the writer, float64 here)
            torch.testing.assert_close(reference_weight(t), _expected_stored(hf_name, hf[hf_name], s),
                                       rtol=0 if t.scale == 1.0 else 1e-6, atol=0, msg=lambda m: f"{name}: {m}")
        tok = loaded.tokenizer
        assert tok.vocab_size == s.vocab
        text = "hello world, the quick brown fox"
        ids = tok.encode(text, add_bos=False)
        assert all(0 <= i < s.vocab for i in ids) and tok.decode(ids) == text


def _damaged(kind: str, good: bytes, rng) -> bytes:
    if kind == "empty":
        return b""
    if kind == "random":
        return bytes(rng.integers(0, 256, 4096, dtype="uint8"))
    if kind == "magic-then-garbage":
        return b"GGUF" + bytes(rng.integers(0, 256, 4096, dtype="uint8"))
    if kind == "truncated":
        return good[: int(len(good) * rng.uniform(0.05, 0.95))]
    raise ValueError(kind)


@spec_settings(12)
@given(kind=st.sampled_from(["empty", "random", "magic-then-garbage", "truncated"]), seed=st.integers(0, 2**31 - 1))
def test_damaged_file_is_a_luce_error(subject, kind: str, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        good_path, bad_path = os.path.join(tmp, "good.gguf"), os.path.join(tmp, "bad.gguf")
        _write(good_path, Shape("llama", "Q8_0", 64, 1, 2, 1, 32, 64, 260, True, 0))
        with open(good_path, "rb") as f:
            good = f.read()
        with open(bad_path, "wb") as f:
            f.write(_damaged(kind, good, rng))
        config = attrs.evolve(subject.config, model_path=bad_path)
        if not subject.reasons(attrs.evolve(subject.config, model_path=good_path)):
            # a GGUF loader may refuse the damaged file up front; if it claims it, load must fail cleanly
            if not subject.reasons(config):
                with pytest.raises(LuceError):
                    subject.create(config).load(bad_path, config)
        else:
            pytest.skip(f"loader {subject.impl.name!r} does not claim a GGUF")

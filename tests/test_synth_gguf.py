"""The synthetic GGUF writer: what the loader reads back is what the writer says it wrote, and
the returned HF-named weights build the same network in transformers."""
from __future__ import annotations

import numpy as np
import pytest

from luce_core.plugin_api import ConfigError
from luce_gguf.loader import load_gguf
from luce_tools.models.args import SYNTH_PRESETS
from luce_tools.models.quants import dequantize_rows
from luce_tools.models.synth import llama_permute, llama_unpermute, main, tiny_vocab, write_synthetic_gguf

SHAPE = dict(hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn=128, vocab=300)

# GGUF name -> HF name, written out here independently of synth.py's own table
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    _, layer, rest = gguf_name.split(".", 2)
    return f"model.layers.{layer}.{LAYER_NAMES[rest]}"


CASES = [("llama", "F32", True), ("llama", "Q4_0", True), ("qwen2", "Q8_0", True), ("qwen3", "Q4_1", True),
         ("qwen2", "BF16", False), ("llama", "F16", False), ("qwen3", "Q4_K", True), ("llama", "NVFP4", True)]


@pytest.mark.parametrize("arch,qtype,tied", CASES)
def test_roundtrip(tmp_path, arch, qtype, tied):
    shape = dict(SHAPE, hidden=256, head_dim=64, ffn=256) if qtype == "Q4_K" else SHAPE  # 256-element blocks
    path = tmp_path / f"{arch}-{qtype}.gguf"
    weights = write_synthetic_gguf(path, arch=arch, **shape, qtype=qtype, tied=tied, seed=3, ctx=4096,
                                   rope_base=500000.0)
    m = load_gguf(path)
    c = m.config
    assert (c.arch, c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab) == \
        (arch, shape["hidden"], 2, 4, 2, shape["head_dim"], shape["ffn"], 300)
    assert (c.ctx_train, c.rope_base, c.rms_eps, c.tied_embeddings) == (4096, 500000.0, 1e-5, tied)
    assert c.rope_style == ("normal" if arch == "llama" else "neox")
    assert (c.qkv_bias, c.qk_norm) == (arch == "qwen2", arch == "qwen3")
    assert m.tokenizer.vocab_size == 300

    assert set(map(hf_name, m.tensors)) | ({"lm_head.weight"} if tied else set()) == set(weights)
    embed_type = qtype if qtype in ("F32", "F16", "BF16", "Q8_0") else "Q8_0"
    for name, q in m.tensors.items():
        matrix = len(q.shape) == 2
        expect = (embed_type if name in ("token_embd.weight", "output.weight") else qtype) if matrix else "F32"
        assert q.qtype == expect, name
        values = dequantize_rows(q.data, q.qtype, q.shape, q.scale)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = 4 if "attn_q" in name else 2
            values = llama_unpermute(values, heads)
        np.testing.assert_array_equal(values, weights[hf_name(name)], err_msg=name)
    if qtype == "NVFP4":  # the FP32 per-tensor scale was written as <name>.scale and folded in
        q = m.tensors["blk.0.attn_v.weight"]
        import gguf

        stored = next(r for r in gguf.GGUFReader(str(path)).tensors if r.name == "blk.0.attn_v.weight.scale")
        assert q.scale == float(stored.data[0]) and 0 < q.scale < 1e-2
    if tied:
        assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    # random matrices are N(0, 0.02) (quantization changes the spread a little)
    up = weights["model.layers.1.mlp.up_proj.weight"]
    assert abs(up.std() / 0.02 - 1) < 0.1 and abs(up.mean()) < 0.002


def test_llama_permutation_matches_hf_rope():
    """GGUF llama Q rows + adjacent-pair RoPE (llama.cpp "normal") == HF rows + rotate_half RoPE."""
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, dim, hidden, base = 4, 16, 64, 10000.0
    rng = np.random.default_rng(0)
    w_hf = rng.standard_normal((heads * dim, hidden)).astype(np.float32)
    x = rng.standard_normal((5, hidden)).astype(np.float32)
    pos = np.arange(5)
    theta = pos[:, None] * base ** (-np.arange(0, dim, 2) / dim)  # [T, dim/2]

    q = (x @ llama_permute(w_hf, heads).T).reshape(5, heads, dim // 2, 2)  # adjacent pairs
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    rot = np.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], axis=-1).reshape(5, heads * dim)
    ours = llama_unpermute(rot.T, heads).T.reshape(5, heads, dim)

    q_hf = torch.from_numpy((x @ w_hf.T).reshape(1, 5, heads, dim)).transpose(1, 2)  # [B, H, T, D]
    emb = torch.from_numpy(np.concatenate([theta, theta], axis=-1)).float()[None]
    ref, _ = apply_rotary_pos_emb(q_hf, q_hf, emb.cos(), emb.sin())
    np.testing.assert_allclose(ours, ref[0].transpose(0, 1).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(llama_unpermute(llama_permute(w_hf, heads), heads), w_hf)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_weights_build_the_model_in_transformers(tmp_path, arch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_oracle import hf_model

    path = tmp_path / "m.gguf"
    weights = write_synthetic_gguf(path, arch=arch, **SHAPE, qtype="Q8_0")
    model = hf_model(load_gguf(path).config, weights)  # strict: names and shapes all match
    with torch.no_grad():
        out = model(torch.tensor([[5, 17, 200, 33, 9, 120]]), output_hidden_states=True)
    logits = out.logits[0]
    # logits = normed hidden (RMS ~1) . N(0, 0.02) embedding rows: std ~ 0.02 * sqrt(64) = 0.16
    assert torch.isfinite(logits).all() and 0.08 < float(logits.std()) < 0.4
    assert float((logits[0] - logits[-1]).abs().max()) > 0.05  # positions see different contexts
    for h in out.hidden_states:
        assert float(h.pow(2).mean().sqrt()) < 5


def test_outlier_channels(tmp_path):
    path = tmp_path / "outliers.gguf"
    weights = write_synthetic_gguf(path, arch="qwen2", **SHAPE, outlier_channels=3)
    m = load_gguf(path)
    import gguf

    chans = gguf.GGUFReader(str(path)).fields["luce.synthetic.outlier_channels"].contents()
    assert len(chans) == 3
    for layer in range(2):
        k = weights[f"model.layers.{layer}.self_attn.k_proj.weight"]
        rms = np.sqrt((k ** 2).mean(axis=1))
        normal = np.delete(rms, chans)
        assert rms[chans].min() > 8 * normal.max()
    assert m.config.n_kv_heads * m.config.head_dim == 32


def test_deterministic(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    for path, seed in ((a, 7), (b, 7), (c, 8)):
        write_synthetic_gguf(path, **SHAPE, qtype="Q4_0", seed=seed, return_weights=False)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_tokenizer_from_real_model(tmp_path, smollm2_path):
    from luce_gguf.tokenizer import load_tokenizer

    path = tmp_path / "smolvocab.gguf"
    write_synthetic_gguf(path, **dict(SHAPE, vocab=None), tokenizer_from=str(smollm2_path), return_weights=False)
    m = load_gguf(path)
    assert m.config.vocab == m.tokenizer.vocab_size == 49152
    real = load_tokenizer(str(smollm2_path))
    text = "<|im_start|>user\nHello, wörld 123!<|im_end|>"
    assert m.tokenizer.encode(text) == real.encode(text)
    assert m.tokenizer.chat_template == real.chat_template and m.tokenizer.eos_ids == real.eos_ids
    with pytest.raises(ConfigError, match="49152 tokens"):
        write_synthetic_gguf(tmp_path / "x.gguf", **SHAPE, tokenizer_from=str(smollm2_path))


def test_tiny_vocab_tokenizer(tmp_path):
    tokens, types, merges = tiny_vocab(300)
    assert len(tokens) == len(types) == 300 and len(merges) == 300 - 259
    path = tmp_path / "tiny.gguf"
    write_synthetic_gguf(path, **SHAPE, return_weights=False)
    tok = load_gguf(path).tokenizer
    text = "<|im_start|>the cat ate\n😀 data 42<|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[0] == 1 and ids[-1] == 2 and 2 in tok.eos_ids
    assert len(tok.encode(" the")) < len(" the".encode())  # merges apply
    with pytest.raises(ConfigError, match="at least 259"):
        tiny_vocab(100)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    # a preset with every shape field overridden: exercises preset + override merging, small and fast
    rc = main([str(out), "--preset", "llama-1.2b", "--arch", "qwen3", "--hidden", "64", "--layers", "1",
               "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--ffn", "96", "--vocab", "280",
               "--qtype", "Q8_0", "--untied", "--quiet"])
    assert rc == 0
    c = load_gguf(out).config
    assert (c.arch, c.hidden, c.n_layers, c.ffn, c.vocab, c.tied_embeddings) == ("qwen3", 64, 1, 96, 280, False)
    assert capsys.readouterr().err.startswith(f"wrote {out} (")
    assert SYNTH_PRESETS["llama-1.2b"] == dict(arch="llama", hidden=2048, n_layers=16, ffn=8192, n_heads=32,
                                         n_kv_heads=8, head_dim=64, vocab=49152)
    assert main([str(out), "--hidden", "64"]) == 2  # neither a preset nor a full shape
    assert capsys.readouterr().err.startswith("luce: error: the model shape lacks --layers, --heads, --ffn")
    assert main([str(out), "--hidden", "48", "--layers", "1", "--heads", "4", "--ffn", "64",
                 "--qtype", "Q4_0", "--quiet"]) == 2  # 48 is not whole 32-blocks: an error, no traceback
    assert "not whole Q8_0 blocks" in capsys.readouterr().err
    assert main([str(out), "--hidden", "64", "--layers", "1", "--heads", "4", "--ffn", "64",
                 "--arch", "gpt9", "--quiet"]) == 2
    assert "arch must be one of llama, qwen2, qwen3" in capsys.readouterr().err

"""Synthetic llama / qwen2 / qwen3 GGUFs with random weights, for tests and benchmarks.

``write_synthetic_gguf`` writes the file (streaming: one tensor in memory at a time) and returns
the weights the file really holds, dequantized to float32 and named as in Hugging Face
transformers, so the same model can be built there as an oracle. CLI (also
``python -m luce_tools.models.synth``)::

    luce model synth OUT.gguf --preset llama-1.2b --qtype Q4_0 --tokenizer-from SMOLLM2.gguf
"""
from __future__ import annotations

import argparse
import os
from typing import Callable

import numpy as np

from luce_core.formats.blocks import BLOCKS
from luce_core.plugin_api import ConfigError
from luce_gguf.arch import ARCHS
from luce_gguf.tokenizer import CONTROL, NORMAL, byte_to_unicode
from luce_tools import harness
from luce_tools.models.args import FILE_TYPES, SYNTH_PRESETS, add_synth_arguments, preset_shape
from luce_tools.models.quants import dequantize_rows, quantize_rows
from luce_tools.models.writer import StreamWriter

# Matrix (and embedding) entries are N(0, 0.02), as trained models of this size roughly have: a
# unit-RMS input of width d gives outputs of RMS 0.02*sqrt(d) (~0.9 at 2048), and RMSNorm keeps
# matrix inputs at unit RMS at any depth. Other tests calibrate their tolerances on this scale.
MATRIX_STD = 0.02
OUTLIER_GAIN = 16.0  # how much larger an outlier K channel is than the rest
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_TINY_VOCAB = 512


# ----------------------------------------------------------------------------- llama Q/K rows
def llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rows -> GGUF rows for llama Q/K: within each head, HF's halves (rotate_half) become
    adjacent pairs, so GGUF's pairwise RoPE equals HF's (what llama.cpp's converter does)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- tokenizer metadata
def tiny_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary of ``size`` tokens: ChatML specials, the 256 bytes, then
    merges of frequent English letter pairs (so common words take fewer tokens than bytes)."""
    b2u = byte_to_unicode()
    tokens = [*SPECIAL_TOKENS, *(b2u[b] for b in range(256))]
    types = [CONTROL] * len(SPECIAL_TOKENS) + [NORMAL] * 256
    if size < len(tokens):
        raise ConfigError(f"a byte-level vocabulary needs at least {len(tokens)} tokens, got vocab={size}")
    space, letters = b2u[ord(" ")], "etaoinshrdlcumwfgypbvkjxqz"
    candidates = [(space, c) for c in letters] + [(a, b) for a in letters for b in letters] \
        + [(space + a, b) for a in letters for b in letters]
    need = size - len(tokens)
    if need > len(candidates):
        raise ConfigError(f"the generated vocabulary holds at most {len(tokens) + len(candidates)} tokens; "
                         "pass tokenizer_from=<a GGUF> for a larger one")
    merges = [f"{a} {b}" for a, b in candidates[:need]]
    tokens += [a + b for a, b in candidates[:need]]
    types += [NORMAL] * need
    return tokens, types, merges


def _tokenizer_kv(out: StreamWriter, tokenizer_from: str | None, vocab: int | None) -> int:
    """Write tokenizer.* metadata; returns the vocabulary size."""
    import gguf

    if tokenizer_from is None:
        tokens, types, merges = tiny_vocab(vocab or DEFAULT_TINY_VOCAB)
        out.add("tokenizer.ggml.model", "gpt2")
        out.add("tokenizer.ggml.pre", "gpt2")
        out.add("tokenizer.ggml.tokens", tokens)
        out.add("tokenizer.ggml.token_type", types, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        out.add("tokenizer.ggml.merges", merges)
        out.add("tokenizer.ggml.bos_token_id", SPECIAL_TOKENS.index("<|im_start|>"))
        out.add("tokenizer.ggml.eos_token_id", SPECIAL_TOKENS.index("<|im_end|>"))
        out.add("tokenizer.ggml.add_bos_token", False)
        return len(tokens)
    from luce_gguf.reader import open_gguf

    src = open_gguf(tokenizer_from)
    for key in src.keys():
        if key.startswith("tokenizer."):
            out.copy_key(src, key)
    n = len(src.get("tokenizer.ggml.tokens"))
    if vocab is not None and vocab != n:
        raise ConfigError(f"vocab={vocab} but {tokenizer_from} has {n} tokens; pass vocab=None to use its size")
    return n


# ----------------------------------------------------------------------------- weights
def _rng(seed: int, index: int) -> np.random.Generator:
    # One stream per planned tensor: its values do not depend on how much earlier tensors drew,
    # and a tensor can be regenerated alone.
    return np.random.default_rng([seed, index])


def write_synthetic_gguf(path: str | os.PathLike[str], *, arch: str = "llama", hidden: int, n_layers: int,
                         n_heads: int, n_kv_heads: int, head_dim: int | None = None, ffn: int,
                         vocab: int | None = None, tied: bool = True, qtype: str = "F32", seed: int = 0,
                         tokenizer_from: str | None = None, ctx: int = 2048, rope_base: float = 10000.0,
                         outlier_channels: int = 0, embed_qtype: str | None = None, rms_eps: float = 1e-5,
                         return_weights: bool = True, progress: bool = False) -> dict[str, np.ndarray]:
    """Write a random ``arch`` model to ``path``; return its float32 weights in HF naming.

    Matrices (attention, MLP) are stored as ``qtype``; the embedding (and untied output) as
    ``embed_qtype`` (default: Q8_0 when matrices are below 8 bits, like SmolLM2's file, else ``qtype``);
    norms and biases as F32. The returned weights are the dequantized stored values (llama Q/K
    un-permuted), so transformers built from them computes what the file describes.
    ``outlier_channels`` K-projection output channels (same ones in every layer) are made
    ``OUTLIER_GAIN`` times larger, as in real models, to exercise KV quantization.
    With ``return_weights=False`` nothing is kept (the CLI writes multi-GB models this way).
    """
    if arch not in ARCHS:
        raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    head_dim = head_dim or hidden // n_heads
    if n_heads % n_kv_heads or head_dim % 2:
        raise ConfigError("n_heads must be a multiple of n_kv_heads and head_dim even")
    if embed_qtype is None:
        embed_qtype = qtype if qtype in ("F32", "F16", "BF16", "Q8_0") else "Q8_0"
    spec = ARCHS[arch]
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    import gguf

    out = StreamWriter(path, arch)
    out.add("general.name", f"luce synthetic {arch} {hidden}x{n_layers} {qtype}")
    out.add("general.file_type", int(gguf.LlamaFileType[FILE_TYPES.get(qtype, "GUESSED")]))
    out.add("general.quantization_version", gguf.GGML_QUANT_VERSION)
    n_vocab = _tokenizer_kv(out, tokenizer_from, vocab)
    p = f"{arch}."
    for key, value in (("context_length", ctx), ("embedding_length", hidden), ("block_count", n_layers),
                       ("feed_forward_length", ffn), ("attention.head_count", n_heads),
                       ("attention.head_count_kv", n_kv_heads), ("attention.key_length", head_dim),
                       ("attention.value_length", head_dim), ("rope.dimension_count", head_dim),
                       ("vocab_size", n_vocab)):
        out.add(p + key, int(value))
    out.add(p + "rope.freq_base", float(rope_base))
    out.add(p + "attention.layer_norm_rms_epsilon", float(rms_eps))
    outliers = np.sort(_rng(seed, 1 << 20).choice(kv_dim, size=min(outlier_channels, kv_dim), replace=False))
    if outlier_channels:
        out.add("luce.synthetic.outlier_channels", [int(c) for c in outliers])

    weights: dict[str, np.ndarray] = {}
    counter = iter(range(1 << 30))

    def tensor(gguf_name: str, hf_name: str | None, shape: tuple[int, ...], kind: str, qt: str,
               make: Callable[[np.random.Generator], np.ndarray] | None = None,
               n_rope_heads: int = 0) -> None:
        """Plan one tensor; ``make`` draws its HF-order values, ``n_rope_heads`` permutes llama Q/K."""
        index = next(counter)
        if qt not in BLOCKS:
            raise ConfigError(f"qtype {qt!r} is not one of {', '.join(FILE_TYPES)}")
        if shape[-1] % BLOCKS[qt][0]:
            raise ConfigError(f"{gguf_name}: rows of {shape[-1]} elements are not whole {qt} blocks "
                             f"of {BLOCKS[qt][0]}; choose sizes that are multiples of it")

        def draw() -> np.ndarray:
            rng = _rng(seed, index)
            if make is not None:
                return make(rng)
            if kind == "norm":
                return rng.uniform(0.8, 1.2, size=shape).astype(np.float32)
            if kind == "bias":
                return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1))
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(MATRIX_STD)

        scale_box: dict[str, float] = {}

        def produce() -> np.ndarray:
            hf = draw()
            stored = llama_permute(hf, n_rope_heads) if n_rope_heads else hf
            data, scale = quantize_rows(stored, qt)
            if return_weights and hf_name is not None:
                deq = dequantize_rows(data, qt, stored.shape, scale)
                weights[hf_name] = llama_unpermute(deq, n_rope_heads) if n_rope_heads else deq
            scale_box["scale"] = scale
            return data

        out.add_tensor(gguf_name, shape, qt, produce)
        if qt == "NVFP4":  # ggml keeps NVFP4's FP32 per-tensor scale in a sibling tensor
            out.add_tensor(gguf_name + ".scale", (1,), "F32",
                           lambda: np.array([scale_box.pop("scale")], dtype=np.float32).view(np.uint8))

    tensor("token_embd.weight", "model.embed_tokens.weight", (n_vocab, hidden), "matrix", embed_qtype)
    for i in range(n_layers):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        rope_q = n_heads if arch == "llama" else 0
        rope_k = n_kv_heads if arch == "llama" else 0

        def k_proj(rng: np.random.Generator) -> np.ndarray:
            w = rng.standard_normal((kv_dim, hidden), dtype=np.float32) * np.float32(MATRIX_STD)
            w[outliers] *= np.float32(OUTLIER_GAIN)
            return w

        tensor(b + "attn_norm.weight", h + "input_layernorm.weight", (hidden,), "norm", "F32")
        tensor(b + "attn_q.weight", h + "self_attn.q_proj.weight", (q_dim, hidden), "matrix", qtype,
               n_rope_heads=rope_q)
        tensor(b + "attn_k.weight", h + "self_attn.k_proj.weight", (kv_dim, hidden), "matrix", qtype,
               make=k_proj, n_rope_heads=rope_k)
        tensor(b + "attn_v.weight", h + "self_attn.v_proj.weight", (kv_dim, hidden), "matrix", qtype)
        if spec.qkv_bias:
            tensor(b + "attn_q.bias", h + "self_attn.q_proj.bias", (q_dim,), "bias", "F32")
            tensor(b + "attn_k.bias", h + "self_attn.k_proj.bias", (kv_dim,), "bias", "F32")
            tensor(b + "attn_v.bias", h + "self_attn.v_proj.bias", (kv_dim,), "bias", "F32")
        if spec.qk_norm:
            tensor(b + "attn_q_norm.weight", h + "self_attn.q_norm.weight", (head_dim,), "norm", "F32")
            tensor(b + "attn_k_norm.weight", h + "self_attn.k_norm.weight", (head_dim,), "norm", "F32")
        tensor(b + "attn_output.weight", h + "self_attn.o_proj.weight", (hidden, q_dim), "matrix", qtype)
        tensor(b + "ffn_norm.weight", h + "post_attention_layernorm.weight", (hidden,), "norm", "F32")
        tensor(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", (ffn, hidden), "matrix", qtype)
        tensor(b + "ffn_up.weight", h + "mlp.up_proj.weight", (ffn, hidden), "matrix", qtype)
        tensor(b + "ffn_down.weight", h + "mlp.down_proj.weight", (hidden, ffn), "matrix", qtype)
    tensor("output_norm.weight", "model.norm.weight", (hidden,), "norm", "F32")
    if not tied:
        tensor("output.weight", "lm_head.weight", (n_vocab, hidden), "matrix", embed_qtype)

    out.write(progress=progress, desc=os.path.basename(os.fspath(path)))
    if return_weights and tied:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


# ----------------------------------------------------------------------------- CLI
def run(a: argparse.Namespace) -> None:
    """``luce model synth``."""
    shape = preset_shape(a, SYNTH_PRESETS, ("arch", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                            "ffn", "vocab"), required=("hidden", "n_layers", "n_heads", "ffn"))
    if a.tokenizer_from and a.vocab is None:
        shape["vocab"] = None  # the tokenizer's size decides
    shape.setdefault("n_kv_heads", shape["n_heads"])
    write_synthetic_gguf(a.out, qtype=a.qtype, embed_qtype=a.embed_qtype, tied=not a.untied,
                         tokenizer_from=a.tokenizer_from, ctx=a.ctx, rope_base=a.rope_base,
                         outlier_channels=a.outlier_channels, seed=a.seed, return_weights=False,
                         progress=not a.quiet, **shape)
    harness.wrote(a.out, f"{os.path.getsize(a.out) / 1e9:.2f} GB")


def main(argv: list[str] | None = None) -> int:
    return harness.main(argv, "luce_tools.models.synth", add_synth_arguments, run)


if __name__ == "__main__":
    raise SystemExit(main())

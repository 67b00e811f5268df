"""Architectures luce runs from GGUF: hyper-parameters -> ModelConfig, and the tensors each needs.

Shapes here are logical row-major (``(out_features, in_features)``), i.e. GGUF's ne reversed.
"""
from __future__ import annotations

import attrs
import numpy as np

from luce_core.plugin_api import ModelConfig, ModelFileError, UnsupportedModelError
from luce_gguf.reader import GGUFFile


@attrs.frozen
class ArchSpec:
    # llama.cpp's converter permutes llama Q/K rows so RoPE rotates adjacent pairs ("normal");
    # qwen2/qwen3 keep HF's row order, rotated as halves ("neox").
    rope_style: str
    qkv_bias: bool = False
    qk_norm: bool = False


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("normal"),
    "qwen2": ArchSpec("neox", qkv_bias=True),
    "qwen3": ArchSpec("neox", qk_norm=True),
}
SUPPORTED_ARCHS = tuple(ARCHS)
ROPE_SCALINGS = ("none", "linear", "yarn")


def architecture(f: GGUFFile) -> str:
    arch = f.get("general.architecture")
    if arch not in ARCHS:
        raise UnsupportedModelError(
            f"{f.path}: architecture {arch!r} is not supported",
            remedy=f"supported architectures: {', '.join(SUPPORTED_ARCHS)}")
    return arch


def _positive_int(f: GGUFFile, key: str, default: int | None = None) -> int:
    value = f.get(key) if default is None else f.get(key, default)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ModelFileError(f"{f.path}: metadata {key}={value!r} is not an integer",
                             remedy="the file is corrupt; re-convert it") from None
    if n <= 0:
        raise ModelFileError(f"{f.path}: metadata {key}={n} must be positive", remedy="the file is corrupt")
    return n


def _f32(value: object) -> float:
    """A FLOAT32 metadata value as the decimal the converter wrote (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def model_config(f: GGUFFile) -> ModelConfig:
    """The ModelConfig described by the file's metadata (tensors are checked by validate())."""
    arch = architecture(f)
    spec = ARCHS[arch]
    p = f"{arch}."
    hidden = _positive_int(f, p + "embedding_length")
    n_heads = _positive_int(f, p + "attention.head_count")
    n_kv = _positive_int(f, p + "attention.head_count_kv", n_heads)
    if n_heads % n_kv:
        raise ModelFileError(f"{f.path}: {n_heads} attention heads are not a multiple of {n_kv} KV heads",
                             remedy="the file is corrupt")
    head_dim = _positive_int(f, p + "attention.key_length", hidden // n_heads if hidden % n_heads == 0 else 0)
    value_dim = _positive_int(f, p + "attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{f.path}: value head size {value_dim} differs from key head size {head_dim}",
                                    remedy="luce supports equal K/V head sizes only")
    rope_dim = _positive_int(f, p + "rope.dimension_count", head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise ModelFileError(f"{f.path}: rope.dimension_count={rope_dim} does not fit head size {head_dim}",
                             remedy="the file is corrupt")

    scaling, factor = "none", 1.0
    kind = f.get(p + "rope.scaling.type", None)
    if kind is not None and kind not in ROPE_SCALINGS:
        raise UnsupportedModelError(f"{f.path}: RoPE scaling {kind!r} is not supported",
                                    remedy=f"supported: {', '.join(ROPE_SCALINGS)} and llama3 (rope_freqs)")
    if kind in ("linear", "yarn"):
        scaling = kind
        factor = _f32(f.get(p + "rope.scaling.factor", 1.0))
    elif f.has(p + "rope.scale_linear"):  # older converters
        scaling, factor = "linear", _f32(f.get(p + "rope.scale_linear"))
    if "rope_freqs.weight" in f.tensors:  # llama 3.1+: per-frequency factors stored as a tensor
        scaling = "llama3"
    if scaling == "linear" and factor == 1.0:
        scaling = "none"

    # The embedding's rows are the logits' width; the token list may be shorter (padding rows).
    if "token_embd.weight" in f.tensors:
        vocab = f.logical_shape("token_embd.weight")[0]
    else:
        vocab = len(f.get("tokenizer.ggml.tokens", []))
    if vocab <= 0:
        raise ModelFileError(f"{f.path}: vocabulary size unknown (no token list, no token_embd.weight)",
                             remedy="the file is incomplete")
    return ModelConfig(
        arch=arch,
        n_layers=_positive_int(f, p + "block_count"),
        hidden=hidden,
        ffn=_positive_int(f, p + "feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab=int(vocab),
        ctx_train=_positive_int(f, p + "context_length", 2048),
        rms_eps=_f32(f.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_base=_f32(f.get(p + "rope.freq_base", 10000.0)),
        rope_dim=rope_dim,
        rope_style=spec.rope_style,
        rope_scaling=scaling,
        rope_factor=factor,
        qkv_bias=spec.qkv_bias,
        qk_norm=spec.qk_norm,
        tied_embeddings="output.weight" not in f.tensors,
        name=str(f.get("general.name", "")),
    )


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (logical shape, required) for every tensor the model graph reads."""
    h, hd = cfg.hidden, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    out: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((cfg.vocab, h), True),
        "output_norm.weight": ((h,), True),
        "output.weight": ((cfg.vocab, h), not cfg.tied_embeddings),
        "rope_freqs.weight": ((cfg.rope_dim // 2,), False),
    }
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        out.update({
            b + "attn_norm.weight": ((h,), True),
            b + "attn_q.weight": ((q, h), True),
            b + "attn_k.weight": ((kv, h), True),
            b + "attn_v.weight": ((kv, h), True),
            b + "attn_output.weight": ((h, q), True),
            b + "ffn_norm.weight": ((h,), True),
            b + "ffn_gate.weight": ((cfg.ffn, h), True),
            b + "ffn_up.weight": ((cfg.ffn, h), True),
            b + "ffn_down.weight": ((h, cfg.ffn), True),
        })
        if cfg.qkv_bias:
            out.update({b + "attn_q.bias": ((q,), True), b + "attn_k.bias": ((kv,), True),
                        b + "attn_v.bias": ((kv,), True)})
        if cfg.qk_norm:
            out.update({b + "attn_q_norm.weight": ((hd,), True), b + "attn_k_norm.weight": ((hd,), True)})
    return out


def _ne(shape: tuple[int, ...]) -> list[int]:
    return list(reversed(shape))


def validate(f: GGUFFile, cfg: ModelConfig) -> list[str]:
    """Check presence and shape of every tensor the model needs; returns the names present.

    Raises ModelFileError naming the file and tensor (missing/misshapen) or
    UnsupportedModelError (a tensor type luce cannot read).
    """
    present = []
    for name, (shape, required) in expected_tensors(cfg).items():
        if name not in f.tensors:
            if required:
                raise ModelFileError(f"{f.path}: tensor {name} is missing ({cfg.arch}, {cfg.n_layers} layers)",
                                     remedy="the file is incomplete or not a standard "
                                            f"{cfg.arch} GGUF; re-convert it")
            continue
        got = f.logical_shape(name)
        if got != shape:
            raise ModelFileError(
                f"{f.path}: tensor {name} has shape {_ne(got)} (GGUF ne order), expected {_ne(shape)} "
                f"for hidden={cfg.hidden}, heads={cfg.n_heads}/{cfg.n_kv_heads}, head_dim={cfg.head_dim}, "
                f"ffn={cfg.ffn}, vocab={cfg.vocab}",
                remedy="the tensor does not match the metadata; the file is corrupt or mis-converted")
        present.append(name)
    return present

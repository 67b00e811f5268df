"""Architectures luce runs from GGUF: hyper-parameters -> ModelConfig, and the tensors each needs.

Shapes here are logical row-major (``(out_features, in_features)``), i.e. GGUF's ne reversed.
"""
from __future__ import annotations

import re

import attrs

from luce_core.plugin_api import ModelConfig, ModelFileError, UnsupportedModelError
from luce_gguf.reader import GGUFFile, echo

_BLOCK = re.compile(r"blk\.(\d{1,9})\.")


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
    arch = f.get_str("general.architecture")
    if arch not in ARCHS:
        raise UnsupportedModelError(
            f"{f.path}: architecture {echo(arch)} is not supported",
            remedy=f"supported architectures: {', '.join(SUPPORTED_ARCHS)}")
    return arch


def _corrupt(f: GGUFFile, what: str) -> ModelFileError:
    return ModelFileError(f"{f.path}: {what}", remedy="the file is corrupt or mis-converted; re-convert it")


def model_config(f: GGUFFile) -> ModelConfig:
    """The ModelConfig described by the file's metadata, every value type- and range-checked
    (tensors are checked by validate())."""
    arch = architecture(f)
    spec = ARCHS[arch]
    p = f"{arch}."
    hidden = f.get_int(p + "embedding_length")
    n_heads = f.get_int(p + "attention.head_count")
    n_kv = f.get_int(p + "attention.head_count_kv", n_heads)
    if n_heads % n_kv:
        raise _corrupt(f, f"{n_heads} attention heads (head_count) are not a multiple of {n_kv} KV heads "
                          "(head_count_kv)")
    if not f.has(p + "attention.key_length") and hidden % n_heads:
        raise _corrupt(f, f"embedding_length {hidden} is not a multiple of head_count {n_heads} "
                          "(and attention.key_length is not given)")
    head_dim = f.get_int(p + "attention.key_length", hidden // n_heads)
    value_dim = f.get_int(p + "attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{f.path}: value head size {value_dim} differs from key head size {head_dim}",
                                    remedy="luce supports equal K/V head sizes only")
    rope_dim = f.get_int(p + "rope.dimension_count", head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise _corrupt(f, f"rope.dimension_count={rope_dim} does not fit head size {head_dim}")

    scaling, factor = "none", 1.0
    kind = f.get_str(p + "rope.scaling.type", None)
    if kind is not None and kind not in ROPE_SCALINGS:
        raise UnsupportedModelError(f"{f.path}: RoPE scaling {echo(kind)} is not supported",
                                    remedy=f"supported: {', '.join(ROPE_SCALINGS)} and llama3 (rope_freqs)")
    if kind in ("linear", "yarn"):
        scaling = kind
        factor = f.get_float(p + "rope.scaling.factor", 1.0)
    elif f.has(p + "rope.scale_linear"):  # older converters
        scaling, factor = "linear", f.get_float(p + "rope.scale_linear")
    if "rope_freqs.weight" in f.tensors:  # llama 3.1+: per-frequency factors stored as a tensor
        scaling = "llama3"
    if scaling == "linear" and factor == 1.0:
        scaling = "none"
    rms_eps = f.get_float(p + "attention.layer_norm_rms_epsilon", 1e-6)
    if rms_eps >= 1:
        raise _corrupt(f, f"attention.layer_norm_rms_epsilon={rms_eps} is not a small positive number")

    # The embedding's rows are the logits' width (required by validate()); the token list may be
    # shorter (padding rows).
    if "token_embd.weight" not in f.tensors:
        raise _corrupt(f, f"tensor token_embd.weight is missing ({arch})")
    vocab = f.logical_shape("token_embd.weight")[0]
    name = f.get("general.name", "")
    return ModelConfig(
        arch=arch,
        n_layers=f.get_int(p + "block_count"),
        hidden=hidden,
        ffn=f.get_int(p + "feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab=int(vocab),
        ctx_train=f.get_int(p + "context_length", 2048),
        rms_eps=rms_eps,
        rope_base=f.get_float(p + "rope.freq_base", 10000.0),
        rope_dim=rope_dim,
        rope_style=spec.rope_style,
        rope_scaling=scaling,
        rope_factor=factor,
        qkv_bias=spec.qkv_bias,
        qk_norm=spec.qk_norm,
        tied_embeddings="output.weight" not in f.tensors,
        name=name[:200] if isinstance(name, str) else "",
    )


def check_layers(f: GGUFFile, n_layers: int) -> None:
    """block_count against the layers the tensor table holds (one pass over the names), so a
    corrupt block_count fails before any per-layer work."""
    present = {int(m.group(1)) for m in map(_BLOCK.match, f.tensors) if m}
    # distinct ints: n of them from 0 to n-1 are exactly range(n) (never built: n may be 10^9)
    if len(present) != n_layers or (present and (min(present), max(present)) != (0, n_layers - 1)):
        held = f"{len(present)} layer(s), blk.{min(present)} to blk.{max(present)}" if present else "no layers"
        raise ModelFileError(f"{f.path}: metadata block_count={n_layers}, but the tensor table holds {held}",
                             remedy="the file is corrupt or incomplete; re-convert or re-download it")


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
    check_layers(f, cfg.n_layers)
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

"""Widen a GGUF model without changing what it computes: a large benchmark target that behaves
like a real model.

A random synthetic 1.2B model decodes noise, so no drafter can predict it and speculative
decoding cannot be measured on it. ``widen_gguf`` instead grows a trained model (SmolLM2-135M)
to a larger shape by zero padding, so every step costs what a model of the new shape costs while
the tokens stay the trained model's:

* **Hidden size.** The new hidden dimensions start at zero (embedding columns) and no layer
  writes to them (their output-projection and down-projection rows are zero), so they stay zero.
  RMSNorm then averages over more dimensions: its weights are scaled by sqrt(h / h') and its
  epsilon by h / h', which gives back the original normalized values exactly in real arithmetic.
* **Heads.** Original head ``j`` of KV group ``g`` becomes head ``g * group' + j``; the new heads
  and KV heads have zero Q/K/V rows and zero output-projection columns, so they add nothing.
* **FFN.** New units have zero gate/up rows and zero down-projection columns (silu(0) * 0 = 0).

Quantized rows are moved as raw blocks (an all-zero block decodes to 0 in every type allowed
here), so the original weights keep their exact bits. The outputs equal the original model's up
to floating-point summation order (qwen3's per-head Q/K norms share the file's one epsilon, so
they see the scaled one: a difference of ~1e-4 of the logits' spread). CLI (also
``python -m luce_tools.models.widen``)::

    luce model widen SmolLM2-135M-Instruct.Q4_1.gguf smollm2-wide-1.2b.gguf --preset smollm2-1.2b
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any

import numpy as np

from luce_core.formats.blocks import BLOCKS
from luce_core.plugin_api import ConfigError, UnsupportedModelError
from luce_gguf.arch import expected_tensors, model_config
from luce_gguf.reader import open_gguf
from luce_tools import harness
from luce_tools.models.args import WIDEN_PRESETS, add_widen_arguments, preset_shape
from luce_tools.models.quants import dequantize_rows, quantize_rows
from luce_tools.models.writer import StreamWriter

# Block types whose all-zero bytes decode to zeros and that carry no per-tensor scale.
ZERO_SAFE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


def _maps(cfg: Any, n_heads: int, n_kv_heads: int) -> dict[str, np.ndarray]:
    """Where each original index goes, per kind of dimension (hidden, q rows, kv rows, ffn)."""
    hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    new_group = n_heads // n_kv_heads
    heads = np.arange(cfg.n_heads)
    new_head = heads // group * new_group + heads % group
    dims = np.arange(hd)
    return {
        "h": np.arange(cfg.hidden),
        "q": (new_head[:, None] * hd + dims).reshape(-1),
        "kv": np.arange(cfg.n_kv_heads * hd),
        "f": np.arange(cfg.ffn),
    }


# tensor name suffix -> (row kind, column kind); None = a vector
_KINDS = {
    "token_embd.weight": ("vocab", "h"), "output.weight": ("vocab", "h"),
    "attn_q.weight": ("q", "h"), "attn_k.weight": ("kv", "h"), "attn_v.weight": ("kv", "h"),
    "attn_output.weight": ("h", "q"),
    "ffn_gate.weight": ("f", "h"), "ffn_up.weight": ("f", "h"), "ffn_down.weight": ("h", "f"),
    "attn_q.bias": ("q", None), "attn_k.bias": ("kv", None), "attn_v.bias": ("kv", None),
    "attn_norm.weight": ("h", None), "ffn_norm.weight": ("h", None), "output_norm.weight": ("h", None),
    "attn_q_norm.weight": ("d", None), "attn_k_norm.weight": ("d", None), "rope_freqs.weight": ("d", None),
}
_NORMS = ("attn_norm.weight", "ffn_norm.weight", "output_norm.weight")


def _kind(name: str) -> tuple[str, str | None]:
    for suffix, kinds in _KINDS.items():
        if name == suffix or name.endswith("." + suffix):
            return kinds
    raise UnsupportedModelError(f"tensor {name}: widen does not know which dimensions it has",
                                remedy="widen handles llama / qwen2 / qwen3 GGUFs with the standard tensor names")


def _place_rows(data: np.ndarray, row_map: np.ndarray | None, rows: int) -> np.ndarray:
    if row_map is None:
        return data
    out = np.zeros((rows, data.shape[1]), dtype=data.dtype)
    out[row_map] = data
    return out


def _block_starts(col_map: np.ndarray, cols: int, qtype: str, name: str) -> np.ndarray:
    """The new block index of each original block of a row, checking no block straddles."""
    elems = BLOCKS[qtype][0]
    starts = col_map[::elems]
    contiguous = (col_map.reshape(-1, elems) == starts[:, None] + np.arange(elems)).all()
    if cols % elems or not contiguous or (starts % elems).any():
        raise ConfigError(f"tensor {name} ({qtype}, {elems}-element blocks) cannot be widened to {cols} columns: "
                          "its blocks would straddle old and new dimensions",
                          remedy=f"choose sizes that are multiples of {elems}")
    return starts // elems


def _place_cols(data: np.ndarray, blocks_to: np.ndarray, cols: int, qtype: str) -> np.ndarray:
    """Move each row's raw blocks to the block indices ``blocks_to``; the rest are zero blocks."""
    elems, nbytes = BLOCKS[qtype]
    out = np.zeros((data.shape[0], cols // elems, nbytes), dtype=np.uint8)
    out[:, blocks_to] = data.reshape(data.shape[0], -1, nbytes)
    return out.reshape(data.shape[0], -1)


def widen_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, hidden: int, ffn: int,
               n_heads: int, n_kv_heads: int, qtype: str | None = None, progress: bool = False) -> None:
    """Write ``dst``: the model ``src`` padded to the given shape, computing the same function.
    ``qtype`` re-stores every matrix in that type (e.g. F16: an unquantized model of the new
    size); the values are then rounded once more, so the function is the same only up to that."""
    f = open_gguf(src)
    cfg = model_config(f)
    if min(hidden, ffn, n_heads, n_kv_heads) <= 0:
        raise ConfigError(f"widen sizes must be positive, got hidden={hidden} ffn={ffn} heads={n_heads} "
                          f"kv heads={n_kv_heads}")
    group, new_group = cfg.n_heads // cfg.n_kv_heads, n_heads // n_kv_heads
    if (hidden < cfg.hidden or ffn < cfg.ffn or n_kv_heads < cfg.n_kv_heads or n_heads % n_kv_heads
            or new_group < group):
        raise ConfigError(
            f"cannot widen {cfg.hidden}/{cfg.ffn}/{cfg.n_heads}/{cfg.n_kv_heads} (hidden/ffn/heads/kv heads) to "
            f"{hidden}/{ffn}/{n_heads}/{n_kv_heads}",
            remedy="every size must be at least the original, heads a multiple of kv heads, and heads per "
                   f"kv head at least {group}")
    maps = _maps(cfg, n_heads, n_kv_heads)
    sizes = {"h": hidden, "q": n_heads * cfg.head_dim, "kv": n_kv_heads * cfg.head_dim, "f": ffn,
             "vocab": cfg.vocab}
    norm_scale = math.sqrt(cfg.hidden / hidden)
    arch = cfg.arch
    out = StreamWriter(dst, arch)
    for key in f.keys():
        if not key.startswith("GGUF."):
            out.copy_key(f, key)
    p = f"{arch}."
    out.add(p + "embedding_length", hidden)
    out.add(p + "feed_forward_length", ffn)
    out.add(p + "attention.head_count", n_heads)
    out.add(p + "attention.head_count_kv", n_kv_heads)
    out.add(p + "attention.key_length", cfg.head_dim)
    out.add(p + "attention.value_length", cfg.head_dim)
    out.add(p + "attention.layer_norm_rms_epsilon", float(cfg.rms_eps * cfg.hidden / hidden))
    out.add("general.name", f"{f.get('general.name', 'model')} widened to {hidden}/{ffn}/{n_heads}/{n_kv_heads}")
    out.add("luce.widened_from", os.path.basename(os.fspath(src)))

    known = set(expected_tensors(cfg))
    for name in f.tensors:
        if name not in known:
            raise UnsupportedModelError(f"{f.path}: tensor {name} is not part of a standard {arch} model",
                                        remedy="widen only copies the tensors luce's model graph reads")
        q = f.qtensor(name)
        if q.qtype not in ZERO_SAFE:
            raise UnsupportedModelError(f"{f.path}: tensor {name} is {q.qtype}, which widen cannot pad",
                                        remedy=f"widen supports {', '.join(ZERO_SAFE)}")
        rk, ck = _kind(name)
        if ck is None and rk == "d":  # per-head vectors (qk norms, rope factors) stay as they are
            out.add_tensor(name, q.shape, q.qtype, lambda q=q: np.asarray(q.data))
            continue
        if ck is None:  # a hidden-sized or head-row vector; RMSNorm weights are rescaled
            if q.qtype != "F32":
                raise UnsupportedModelError(f"{f.path}: vector {name} is {q.qtype}, expected F32",
                                            remedy="re-convert the model (llama.cpp keeps vectors in F32)")
            v = q.data.view(np.float32).reshape(-1)
            if name.endswith(_NORMS):
                v = v * np.float32(norm_scale)
            w = np.zeros(sizes[rk], dtype=np.float32)
            w[maps[rk]] = v
            out.add_tensor(name, (sizes[rk],), "F32", lambda w=w: w.view(np.uint8))
            continue
        shape = (sizes[rk], sizes[ck])
        blocks_to = _block_starts(maps[ck], shape[1], q.qtype, name)  # checked before anything is written

        def produce(q=q, rk=rk, shape=shape, blocks_to=blocks_to) -> np.ndarray:
            data = _place_cols(np.asarray(q.data), blocks_to, shape[1], q.qtype)
            data = _place_rows(data, None if rk == "vocab" else maps[rk], shape[0])
            if qtype is None or qtype == q.qtype:
                return data
            return quantize_rows(dequantize_rows(data, q.qtype, shape), qtype)[0]

        out.add_tensor(name, shape, qtype or q.qtype, produce)
    out.write(progress=progress, desc=os.path.basename(os.fspath(dst)))


def parameter_count(path: str | os.PathLike[str]) -> int:
    f = open_gguf(path)
    return int(sum(np.prod(f.logical_shape(n)) for n in f.tensors))


def run(a: argparse.Namespace) -> None:
    """``luce model widen``."""
    shape = preset_shape(a, WIDEN_PRESETS, ("hidden", "ffn", "n_heads", "n_kv_heads"))
    widen_gguf(a.src, a.out, qtype=a.qtype, progress=not a.quiet, **shape)
    harness.wrote(a.out, f"{os.path.getsize(a.out) / 1e9:.2f} GB, {parameter_count(a.out) / 1e9:.2f} B parameters")


def main(argv: list[str] | None = None) -> int:
    return harness.main(argv, "luce_tools.models.widen", add_widen_arguments, run)


if __name__ == "__main__":
    raise SystemExit(main())

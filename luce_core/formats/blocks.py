"""ggml block geometry of weights and KV caches, and the exact byte counts that follow from it
(pure data and arithmetic: no torch, no kernels).

KV caches and feature mirrors.

The storage of one vector of ``n`` elements in a KV dtype:

=======  ==========================  ==========================================
dtype    bytes for ``n`` elements    layout
=======  ==========================  ==========================================
f32      ``n * 4``                   IEEE binary32, little-endian
f16      ``n * 2``                   IEEE binary16
bf16     ``n * 2``                   bfloat16 (upper half of binary32)
q8_0     ``n / 32 * 34``             ggml Q8_0 blocks: fp16 d + 32 int8
q4_0     ``n / 32 * 18``             ggml Q4_0 blocks: fp16 d + 16 nibble bytes
=======  ==========================  ==========================================

A KV cache stores, per position, per layer and per KV head, one K vector and one V vector of
``head_dim`` elements, so its bytes per token are
``n_layers * n_kv_heads * (vector_bytes(head_dim, k_dtype) + vector_bytes(head_dim, v_dtype))``
and a store of ``capacity`` positions holds exactly ``capacity`` times that. Block dtypes quantize
each head vector on its own, so ``head_dim`` must be a multiple of 32 for them.
"""
from __future__ import annotations

from luce_core.config import KV_DTYPES
from luce_core.contract.errors import ConfigError, UnsupportedModelError

# name -> (elements per block, bytes per block); matches gguf.GGML_QUANT_SIZES.
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
    "NVFP4": (64, 36),
}
SUPPORTED = tuple(BLOCKS)


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of ``n`` elements; the row length must be whole blocks."""
    try:
        elems, nbytes = BLOCKS[qtype]
    except KeyError:
        raise UnsupportedModelError(f"tensor type {qtype} is not supported",
                                    remedy=f"supported types: {', '.join(SUPPORTED)}; re-quantize the model") from None
    if n % elems:
        raise UnsupportedModelError(f"{qtype} rows must be a multiple of {elems} elements, got {n}")
    return n // elems * nbytes

from luce_core.formats.blocks import BLOCKS

# dtype -> (elements per block, bytes per block): the ggml geometry of the same-named type
KV_BLOCKS: dict[str, tuple[int, int]] = {d: BLOCKS[d.upper()] for d in KV_DTYPES}
QUANTIZED = frozenset(d for d, (elems, _) in KV_BLOCKS.items() if elems > 1)


def vector_bytes(n: int, dtype: str) -> int:
    """Bytes of one ``n``-element vector stored as ``dtype``."""
    try:
        elems, nbytes = KV_BLOCKS[dtype]
    except KeyError:
        raise ConfigError(f"kv dtype {dtype!r} is unknown",
                          remedy=f"use one of {', '.join(KV_BLOCKS)}") from None
    if n <= 0 or n % elems:
        raise ConfigError(f"kv dtype {dtype} stores vectors in blocks of {elems} elements; "
                          f"a vector of {n} elements does not fit",
                          remedy="use f32, f16 or bf16 for this shape")
    return n // elems * nbytes


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, k_dtype: str, v_dtype: str) -> int:
    """Bytes one position occupies in a KV cache (all layers, K and V).

    Per layer per KV head: ``head_dim*4`` (f32), ``head_dim*2`` (f16, bf16),
    ``head_dim/32*34`` (q8_0) or ``head_dim/32*18`` (q4_0) bytes, for K and V separately.
    """
    return n_layers * n_kv_heads * (vector_bytes(head_dim, k_dtype) + vector_bytes(head_dim, v_dtype))


def feature_split(width: int, dtype: str) -> int:
    """Elements per half when a ``width``-wide feature row is stored as a K half and a V half.

    Each half must be whole blocks, so an odd number of blocks (or an odd float width) gets one
    zero-padded block (element) on the V half. Hidden sizes of real models are multiples of 64,
    so in practice the split is exact.
    """
    vector_bytes(width, dtype)  # validates dtype and block divisibility
    elems = KV_BLOCKS[dtype][0]
    blocks = width // elems
    return (blocks + 1) // 2 * elems


def feature_bytes_per_token(width: int, dtype: str) -> int:
    """Bytes one position of a feature mirror occupies: ``width*4/2/2`` for f32/f16/bf16,
    ``width/32*34`` for q8_0, plus one padding block (element) when the width does not split
    into two whole-block halves (see ``feature_split``)."""
    return 2 * vector_bytes(feature_split(width, dtype), dtype)

"""Weight storage formats luce reads: ggml block geometry (pure data, no kernels)."""
from __future__ import annotations

from luce_core.errors import UnsupportedModelError

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

"""Float <-> ggml block bytes for writing GGUFs (numpy; gguf.quants where it can, luce_torch else).

gguf.quants quantizes F16/BF16/Q8_0/Q4_0/Q4_1 (and Q5_x, ...) bit-exactly like ggml but has no
quantizer for the K-quants or NVFP4; those come from ``luce_core.formats.quantize``, imported only
when asked for so writing a Q4_0 file needs no torch.
"""
from __future__ import annotations

import numpy as np

from luce_core.plugin_api import ConfigError

# Types whose quantizer lives in luce_torch (gguf.quants only dequantizes them).
TORCH_QUANTIZED = ("Q4_K", "Q6_K", "NVFP4")


def _ggml_type(qtype: str):
    import gguf

    try:
        return gguf.GGMLQuantizationType[qtype]
    except KeyError:
        raise ConfigError(f"unknown ggml type {qtype!r}",
                          remedy="use a ggml type name such as F32, F16, Q8_0, Q4_0") from None


def quantize_rows(x: np.ndarray, qtype: str) -> tuple[np.ndarray, float]:
    """``x`` (rows along the last axis) as ggml ``qtype`` bytes uint8 [rows, row_bytes], and the
    per-tensor scale (NVFP4's second-level FP32 scale; 1.0 for every other type)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    if qtype == "F32":
        return rows.view(np.uint8), 1.0
    if qtype == "F16":
        return rows.astype(np.float16).view(np.uint8), 1.0
    if qtype in TORCH_QUANTIZED:
        import torch

        from luce_core.formats import quantize as lq

        t = torch.from_numpy(rows)
        if qtype == "NVFP4":
            data, scale = lq.quantize_nvfp4(t)
            return np.ascontiguousarray(data, dtype=np.uint8), float(scale)
        return np.ascontiguousarray(lq.quantize(t, qtype), dtype=np.uint8), 1.0
    from gguf.quants import quantize

    try:
        out = quantize(rows, _ggml_type(qtype))
    except NotImplementedError:
        raise ConfigError(f"no quantizer for {qtype}", remedy="choose F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                                                              "Q4_K, Q6_K or NVFP4") from None
    return np.ascontiguousarray(out).view(np.uint8).reshape(rows.shape[0], -1), 1.0


def dequantize_rows(data: np.ndarray, qtype: str, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """The float32 values of ggml ``qtype`` bytes, in logical ``shape`` (oracle: gguf.quants)."""
    if qtype == "F32":
        out = np.ascontiguousarray(data).view(np.float32)
    elif qtype == "F16":
        out = np.ascontiguousarray(data).view(np.float16).astype(np.float32)
    else:
        from gguf.quants import dequantize

        out = dequantize(np.ascontiguousarray(data), _ggml_type(qtype)).astype(np.float32, copy=False)
    out = out.reshape(shape)
    if scale != 1.0:
        out = out * np.float32(scale)
    return out

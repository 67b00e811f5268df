"""Every kernel program luce_cuda compiles: source file, defines, entry points, SM range.

Kernel names follow ``<op>_<qtype>_<act>[_<variant>]``; ``QTYPES`` maps ggml type names to the
name used in the kernels, ``ACTS`` torch dtypes (by name) to the activation suffix.
"""
from __future__ import annotations

from luce_cuda.compile import KernelProgram

QTYPES: dict[str, str] = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0", "Q4_K": "q4_k", "Q6_K": "q6_k",
                          "NVFP4": "nvfp4"}
ACTS: dict[str, str] = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}


_QFMT = {"q4_0": "FQ4_0", "q4_1": "FQ4_1", "q8_0": "FQ8_0", "q4_k": "FQ4_K", "q6_k": "FQ6_K", "nvfp4": "FNVFP4"}


def _qdefs(q: str) -> tuple[tuple[str, str], ...]:
    return (("LUCE_QNAME", q), ("LUCE_QFMT", _QFMT[q]))


# One program per weight format, so a model compiles only what it uses.
GEMV: dict[str, KernelProgram] = {
    q: KernelProgram(name=f"gemv_{q}", source="gemv.cu", min_sm=75, defines=_qdefs(q),
                     kernels=(f"gemv_{q}_f16", f"gemv_{q}_bf16", f"gemv_{q}_f32", f"dequant_{q}"))
    for q in QTYPES.values()}

# Prefill GEMM on tensor cores: FP16 WMMA from SM 7.5 (the SM75 path, also usable later), BF16
# WMMA from SM 8.0. Activations are in the MMA type.
GEMM_F16: dict[str, KernelProgram] = {
    q: KernelProgram(name=f"gemm_{q}_f16", source="gemm.cu", min_sm=75, needs_mma_h=True,
                     defines=(*_qdefs(q), ("LUCE_MMA_BF16", "0")), kernels=(f"gemm_{q}_f16",))
    for q in QTYPES.values()}
GEMM_BF16: dict[str, KernelProgram] = {
    q: KernelProgram(name=f"gemm_{q}_bf16", source="gemm.cu", min_sm=80, needs_mma_h=True,
                     defines=(*_qdefs(q), ("LUCE_MMA_BF16", "1")), kernels=(f"gemm_{q}_bf16",))
    for q in QTYPES.values()}

_KV = ("f16", "bf16")  # cache dtypes the attention kernels read (f32 caches use the torch path)
HEAD_DIMS = (64, 128)

ATTN_DECODE = KernelProgram(
    name="attn_decode", source="attention_decode.cu", min_sm=75,
    kernels=tuple(f"flash_decode_{kv}_d{d}" for kv in _KV for d in HEAD_DIMS)
    + tuple(f"flash_decode_combine_{a}" for a in ACTS.values()))

# Causal prefill attention with mma.sync m16n8k8, FP16 operands (f16 and bf16 caches), SM 7.5+.
ATTN_PREFILL = KernelProgram(
    name="attn_prefill", source="attention_prefill.cu", min_sm=75,
    kernels=tuple(f"flash_prefill_{kv}_d{d}" for kv in _KV for d in HEAD_DIMS))

OPS = KernelProgram(
    name="ops", source="ops.cu", min_sm=75,
    kernels=tuple(f"{op}_{a}" for op in ("rms_norm", "rope_normal", "rope_neox", "swiglu") for a in ACTS.values()))

ALL: tuple[KernelProgram, ...] = (*GEMV.values(), *GEMM_F16.values(), *GEMM_BF16.values(), ATTN_DECODE,
                                  ATTN_PREFILL, OPS)

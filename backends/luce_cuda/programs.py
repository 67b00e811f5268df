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


# The large Q4_0/Q8_0 decode GEMVs are latency-bound: capped at 64 registers, 4 blocks (32 warps)
# fit per SM instead of 3 and more weight loads are in flight (measured on an H200: 7-19 % faster
# on 1.2B shapes; sm_90 ptxas: Q8_0 no spill, Q4_0 12 bytes). SmolLM2's small Q4_1 GEMVs got
# slower with it, and the K-quants would spill hundreds of bytes: they keep the compiler's choice.
_GEMV_MINB = {"q4_0": 4, "q8_0": 4}


def _qdefs(q: str) -> tuple[tuple[str, str], ...]:
    return (("LUCE_QNAME", q), ("LUCE_QFMT", _QFMT[q]))


# Formats whose decode GEMV also comes with int8 activations (kernels *_q8, f16/bf16 only): the
# dot products become dp4a, a quarter of the float path's instructions (kernels/gemv.cu).
GEMV_Q8 = frozenset({"q4_0", "q4_1", "q8_0"})


def _gemv_kernels(q: str) -> tuple[str, ...]:
    kinds = ("", "_x8", "_norm")  # the fused RMSNorm: one-row kernels only (kernels/gemv.cu)
    names = [f"gemv_{q}_{a}{x}" for a in ("f16", "bf16", "f32") for x in kinds]
    if q in GEMV_Q8:
        names += [f"gemv_{q}_{a}{x}_q8" for a in ("f16", "bf16") for x in kinds]
    return (*names, f"dequant_{q}")


# Formats whose GEMVs can run several x rows side by side (grid y = a group of 1-8 rows; kernels/gemv.cu):
# not the register-capped ones, which spilled more with the row offsets.
GEMV_ROWPAR = frozenset(q for q in QTYPES.values() if q not in _GEMV_MINB)

# One program per weight format, so a model compiles only what it uses.
GEMV: dict[str, KernelProgram] = {
    q: KernelProgram(name=f"gemv_{q}", source="gemv.cu", min_sm=75, pdl=True,
                     defines=(*_qdefs(q), ("LUCE_GEMV_MINB", str(_GEMV_MINB.get(q, 1))),
                              ("LUCE_GEMV_Q8", "1" if q in GEMV_Q8 else "0"),
                              ("LUCE_GEMV_ROWPAR", "1" if q in GEMV_ROWPAR else "0")),
                     kernels=_gemv_kernels(q))
    for q in QTYPES.values()}

# Prefill GEMM on tensor cores: FP16 WMMA from SM 7.5 (the SM75 path, also usable later), BF16
# WMMA from SM 8.0. Activations are in the MMA type.
GEMM_F16: dict[str, KernelProgram] = {
    q: KernelProgram(name=f"gemm_{q}_f16", source="gemm.cu", min_sm=75, needs_mma_h=True, pdl=True,
                     defines=(*_qdefs(q), ("LUCE_MMA_BF16", "0")), kernels=(f"gemm_{q}_f16",))
    for q in QTYPES.values()}
GEMM_BF16: dict[str, KernelProgram] = {
    q: KernelProgram(name=f"gemm_{q}_bf16", source="gemm.cu", min_sm=80, needs_mma_h=True, pdl=True,
                     defines=(*_qdefs(q), ("LUCE_MMA_BF16", "1")), kernels=(f"gemm_{q}_bf16",))
    for q in QTYPES.values()}

_KV = ("f16", "bf16")  # cache dtypes the prefill kernel reads (others are converted first)
# Cache formats flash-decode reads, K and V independently: one kernel per K format and head dim,
# V's format is an argument (a switch outside the inner loop), so all 25 pairs cost 10 kernels
# (twice: blocks of 8 query rows, and of 4 for decode steps of GQA groups up to 4).
# One program per K format (the split merge happens in the same kernel): a model compiles one of them.
KV_FORMATS = ("f16", "bf16", "f32", "q8_0", "q4_0")
HEAD_DIMS = (64, 128)

ATTN_DECODE: dict[str, KernelProgram] = {
    kv: KernelProgram(name=f"attn_decode_{kv}", source="attention_decode.cu", min_sm=75, pdl=True,
                      defines=(("LUCE_KV_K", str(i)),),
                      kernels=tuple(f"flash_decode_{kv}_d{d}{g}" for d in HEAD_DIMS for g in ("", "_g4")))
    for i, kv in enumerate(KV_FORMATS)}
# The same kernels with tree rows (DDTree verification), apart: compiled only when trees are verified.
ATTN_DECODE_TREE: dict[str, KernelProgram] = {
    kv: KernelProgram(name=f"attn_decode_tree_{kv}", source="attention_decode.cu", min_sm=75, pdl=True,
                      defines=(("LUCE_KV_K", str(i)), ("LUCE_TREE", "1")),
                      kernels=tuple(f"flash_decode_{kv}_d{d}{g}_tree" for d in HEAD_DIMS for g in ("", "_g4")))
    for i, kv in enumerate(KV_FORMATS)}

# Causal prefill attention with mma.sync m16n8k8, FP16 operands (f16 and bf16 caches), SM 7.5+.
ATTN_PREFILL = KernelProgram(
    name="attn_prefill", source="attention_prefill.cu", min_sm=75, pdl=True,
    kernels=tuple(f"flash_prefill_{kv}_d{d}" for kv in _KV for d in HEAD_DIMS))

OPS = KernelProgram(
    name="ops", source="ops.cu", min_sm=75, pdl=True,
    kernels=tuple(f"{op}_{a}" for op in ("rms_norm", "rope_normal", "rope_neox", "rope_qk_normal", "rope_qk_neox",
                                          "swiglu") for a in ACTS.values()))

# Fused KV-cache append (rotate + quantize/convert + scatter of K and V in one launch). The head
# vector sits in shared memory as f32: head_dim up to KV_MAX_DIM (32 KiB, under the 48 KiB default).
KV_MAX_DIM = 8192
KV_APPEND = KernelProgram(name="kv_append", source="kv_append.cu", min_sm=75, pdl=True, kernels=("kv_append",))

ALL: tuple[KernelProgram, ...] = (*GEMV.values(), *GEMM_F16.values(), *GEMM_BF16.values(), *ATTN_DECODE.values(),
                                  *ATTN_DECODE_TREE.values(), ATTN_PREFILL, OPS, KV_APPEND)

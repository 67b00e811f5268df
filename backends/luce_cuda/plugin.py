"""Descriptors of luce_cuda (imports nothing heavy: no torch, no CUDA).

linear    "cuda"       SM >= 8.0: GEMV for decode, BF16/FP16 WMMA GEMM for prefill
          "cuda-sm75"  SM >= 7.5: same GEMV, FP16 WMMA GEMM only (e.g. RTX 2080 Ti)
attention "cuda"       SM >= 7.5: flash-decode reading f16/bf16/f32/q8_0/q4_0 caches (K and V
                       independently) + FP16 mma.sync flash-prefill; reads dense-v1 stores only
kv_storage "cuda"      the dense-v1 layout (luce_core.contract.kv_layout), one fused append kernel
"""
from __future__ import annotations

from luce_core.plugin_api import CONTRACT_VERSION, DENSE_V1, Caps, Impl, RunConfig, hookimpl

INSTALL = "NVRTC not installed (pip install luce[cuda])"
# Weight types the CUDA linear reads (quantized by kernels, float via cuBLAS).
LINEAR_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "NVFP4", "F32", "F16", "BF16"})
HEAD_DIMS = (64, 128)


def _base(caps: Caps, config: RunConfig, min_sm: int) -> list[str]:
    if config.device == "cpu":
        return ["device=cpu was asked for"]
    if caps.cc is None:
        return ["no NVIDIA GPU"]
    out: list[str] = []
    if not caps.torch_cuda:
        out.append("torch has no CUDA (install a CUDA build of torch)")
    if caps.nvrtc is None:
        out.append(INSTALL)
    elif caps.nvrtc_archs and min(caps.nvrtc_archs) > caps.sm:
        out.append(f"NVRTC {caps.nvrtc[0]}.{caps.nvrtc[1]} cannot target sm_{caps.sm}")
    if caps.sm < min_sm:
        out.append(f"needs SM >= {min_sm // 10}.{min_sm % 10} (have {caps.cc[0]}.{caps.cc[1]})")
    return out


def _type_reasons(config: RunConfig) -> list[str]:
    bad = sorted(set(config.weight_types) - LINEAR_TYPES)
    return [f"no CUDA kernel for tensor type(s) {', '.join(bad)}"] if bad else []


def _linear_requires(min_sm: int, tc: str):
    def requires(caps: Caps, config: RunConfig) -> list[str]:
        out = _base(caps, config, min_sm)
        if caps.cc is not None and not getattr(caps, tc):
            out.append(f"no {tc.replace('_tc', '').upper()} tensor cores")
        return out + _type_reasons(config)
    return requires


def _fp4tc_requires(caps: Caps, config: RunConfig) -> list[str]:
    """Native NVFP4 MMA (tcgen05 / mma.sync kind::mxf4nvf4) exists only on SM 10.x and 12.x."""
    out = _base(caps, config, 75)
    if caps.cc is not None and not caps.fp4_tc:
        out.append(f"needs SM 10.0 or 12.0 FP4 tensor cores (have {caps.cc[0]}.{caps.cc[1]})")
    if config.weights != "nvfp4" and "NVFP4" not in config.weight_types:
        out.append("weights are not NVFP4 (use --weights nvfp4 or an NVFP4 GGUF)")
    return out + _type_reasons(config)


def _attention_requires(caps: Caps, config: RunConfig) -> list[str]:
    from luce_cuda.programs import KV_FORMATS  # light: no torch, no CUDA

    out = _base(caps, config, 75)
    for name, dt in (("K", config.kv_k), ("V", config.kv_v)):
        if dt not in KV_FORMATS:
            out.append(f"kernels read {'/'.join(KV_FORMATS)} caches, not {name}={dt}")
    if config.model is not None and config.model.head_dim not in HEAD_DIMS:
        out.append(f"no kernel for head_dim {config.model.head_dim} (have {', '.join(map(str, HEAD_DIMS))})")
    return out


@hookimpl
def provide_linear() -> list[Impl]:
    return [
        Impl("linear", "cuda", "luce_cuda.linear:make_bf16", priority=20,
             requires=_linear_requires(80, "bf16_tc"),
             summary="quantized GEMV (decode) + BF16/FP16 WMMA GEMM (prefill), NVRTC-compiled",
             contract=CONTRACT_VERSION),
        Impl("linear", "cuda-sm75", "luce_cuda.linear:make_sm75", priority=10,
             requires=_linear_requires(75, "fp16_tc"),
             summary="quantized GEMV (decode) + FP16 WMMA GEMM (prefill), for SM 7.5+", contract=CONTRACT_VERSION),
        # Declared so selection and `luce doctor` can say where it would run; its factory raises
        # KernelError (no native FP4 MMA kernel yet), so plan falls back to "cuda" with a warning.
        Impl("linear", "cuda-fp4tc", "luce_cuda.fp4tc:make", priority=30, requires=_fp4tc_requires,
             summary="NVFP4 weights on native FP4 tensor cores (SM 10.x/12.x); not implemented yet",
             contract=CONTRACT_VERSION),
    ]


@hookimpl
def provide_attention() -> list[Impl]:
    return [Impl("attention", "cuda", "luce_cuda.attention:CudaAttention", priority=20,
                 requires=_attention_requires,
                 summary="flash-decode (split over the sequence, GQA) + causal mma.sync flash-prefill",
                 contract=CONTRACT_VERSION, reads_kv_layouts=(DENSE_V1,))]


def _kv_requires(caps: Caps, config: RunConfig) -> list[str]:
    from luce_cuda.programs import KV_MAX_DIM  # light: no torch, no CUDA

    out = _base(caps, config, 75)  # every KV dtype (RunConfig validates them) has a kernel path
    if config.model is not None and config.model.head_dim > KV_MAX_DIM:
        out.append(f"no append kernel for head_dim {config.model.head_dim} (at most {KV_MAX_DIM})")
    return out


@hookimpl
def provide_kv_storage() -> list[Impl]:
    return [Impl("kv_storage", "cuda", "luce_cuda.kv:CudaKVStorage", priority=20, requires=_kv_requires,
                 summary="fused rotate+quantize+append kernel (f32/f16/bf16/q8_0/q4_0)", contract=CONTRACT_VERSION,
                 kv_layout=DENSE_V1)]

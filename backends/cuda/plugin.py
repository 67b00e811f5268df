"""Descriptors of luce_cuda (imports nothing heavy: no torch, no CUDA).

linear    "cuda"       SM >= 8.0: GEMV for decode, BF16/FP16 WMMA GEMM for prefill
          "cuda-sm75"  SM >= 7.5: same GEMV, FP16 WMMA GEMM only (e.g. RTX 2080 Ti)
attention "cuda"       SM >= 7.5: flash-decode + FP16 mma.sync flash-prefill over f16/bf16 caches
"""
from __future__ import annotations

from luce_core import Impl, hookimpl
from luce_core.caps import Caps
from luce_core.config import RunConfig

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


def _linear_requires(min_sm: int, tc: str):
    def requires(caps: Caps, config: RunConfig) -> list[str]:
        out = _base(caps, config, min_sm)
        if caps.cc is not None and not getattr(caps, tc):
            out.append(f"no {tc.replace('_tc', '').upper()} tensor cores")
        bad = sorted(set(config.weight_types) - LINEAR_TYPES)
        if bad:
            out.append(f"no CUDA kernel for tensor type(s) {', '.join(bad)}")
        return out
    return requires


def _attention_requires(caps: Caps, config: RunConfig) -> list[str]:
    out = _base(caps, config, 75)
    for name, dt in (("K", config.kv_k), ("V", config.kv_v)):
        if dt not in ("f16", "bf16"):
            out.append(f"kernels read f16/bf16 caches, not {name}={dt}")
    if config.model is not None and config.model.head_dim not in HEAD_DIMS:
        out.append(f"no kernel for head_dim {config.model.head_dim} (have {', '.join(map(str, HEAD_DIMS))})")
    return out


@hookimpl
def provide_linear() -> list[Impl]:
    return [
        Impl("linear", "cuda", "luce_cuda.linear:make_bf16", priority=20,
             requires=_linear_requires(80, "bf16_tc"),
             summary="quantized GEMV (decode) + BF16/FP16 WMMA GEMM (prefill), NVRTC-compiled"),
        Impl("linear", "cuda-sm75", "luce_cuda.linear:make_sm75", priority=10,
             requires=_linear_requires(75, "fp16_tc"),
             summary="quantized GEMV (decode) + FP16 WMMA GEMM (prefill), for SM 7.5+"),
    ]


@hookimpl
def provide_attention() -> list[Impl]:
    return [Impl("attention", "cuda", "luce_cuda.attention:CudaAttention", priority=20,
                 requires=_attention_requires,
                 summary="flash-decode (split over the sequence, GQA) + causal mma.sync flash-prefill")]

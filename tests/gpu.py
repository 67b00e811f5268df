"""Why the GPU tests of the CUDA backend cannot run here ("" when they can): one probe for
every test module that launches luce_cuda kernels."""
from __future__ import annotations

import pytest
import torch


def _gpu_reason() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA build of torch and an NVIDIA GPU"
    try:
        from luce_cuda.compile import nvrtc_version

        nvrtc_version()
    except Exception as e:  # noqa: BLE001
        return f"NVRTC unavailable: {e}"
    return ""


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")

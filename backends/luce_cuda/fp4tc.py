"""The ``cuda-fp4tc`` linear: NVFP4 weights on native FP4 tensor cores (SM 10.x / 12.x).

Declared in luce_cuda.plugin so selection and ``luce doctor`` show where it would run, but no
native FP4 MMA kernel is written yet (and none could be tested without an SM 10.x/12.x GPU), so
the factory refuses instead of pretending: plan records a first-use failure and falls back to
the next candidate ("cuda", whose GEMV/GEMM decode E2M1 in software on any SM >= 7.5).
"""
from __future__ import annotations

from luce_core.plugin_api import Caps, KernelError, RunConfig


def make(caps: Caps, config: RunConfig) -> object:
    raise KernelError("native FP4 tensor-core GEMM is not implemented yet; NVFP4 weights run on the "
                      "software E2M1 decode of the 'cuda' linear instead",
                      remedy="nothing to do (luce falls back by itself); --linear cuda skips this attempt")

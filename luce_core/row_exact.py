"""Is a matmul row-count invariant? A bit-for-bit check of one weight on this machine's kernels.

Lossless speculative decoding needs a verify forward of m rows to round every row exactly as the
one-row decode step it replaces. A BLAS library picks its kernel, blocking and summation order
from the shapes, the layout and the alignment of the operands, not from their values, so one
m-row product of random rows against the m one-row products, with the weight itself, decides
whether m rows take the reduction order of one row: equal bits on thousands of random outputs
are not a coincidence. Callers cache the answer per weight and m (it costs 2 m products).

Only where the inputs' alignment is fixed too does the answer carry over to later calls: torch's
CUDA caching allocator aligns every block to 512 bytes, so it does for cuBLAS. CPU BLAS libraries
were seen to change a row's rounding with the weight buffer's address alone (MKL/oneDNN bf16:
one of SmolLM2's 30 identically shaped down projections), so the torch reference on the CPU does
not rely on this check and verifies row by row instead.
"""
from __future__ import annotations

from typing import Callable

import torch


def rows_exact(matmul: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, m: int) -> bool:
    """Whether ``matmul`` (x [m, K] -> [m, N], ``weight`` [N, K]) gives each of m rows bit for
    bit what it gives that row alone."""
    if m <= 1:
        return True
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("rows_exact reads results on the host: call it before a CUDA-graph capture")
    g = torch.Generator(device="cpu").manual_seed(m)
    x = torch.randn(m, weight.shape[1], generator=g).to(weight.device, weight.dtype)
    together = matmul(x)
    # each row in an allocation of its own, aligned as a decode step's activations are
    alone = torch.cat([matmul(x[i:i + 1].clone()) for i in range(m)])
    return bool(torch.equal(together, alone))

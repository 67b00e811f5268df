"""Quick bandwidth figures for the decode GEMV (and the prefill GEMM), on a CUDA machine.

    luce cuda gemv   (or python -m luce_tools.cuda.bench_gemv)

GEMV time is measured on CUDA-graph replays of 32 launches that rotate over enough copies of
the weight to defeat L2, with CUDA events; GB/s counts weight bytes (packed quants + scales)
plus x and y. The reference ceiling is a 1 GiB device-to-device copy (bytes read + written).
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from luce_core.formats.blocks import BLOCKS
from luce_core.formats.dtypes import DTYPE_NAMES
from luce_core.plugin_api import QTensor
from luce_tools import harness
from luce_tools.cuda.args import add_gemv_arguments


def _events_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _events_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def _weight(qtype: str, n: int, k: int, seed: int) -> QTensor:
    rng = np.random.default_rng(seed)
    elems, nbytes = BLOCKS[qtype]
    nb = n * k // elems
    b = rng.integers(0, 256, size=(nb, nbytes), dtype=np.uint8)
    b[:, 0:2] = rng.uniform(-0.02, 0.02, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return QTensor(f"bench.{qtype}", qtype, (n, k), b.reshape(n, -1))


def gemv_gbps(qtype: str, n: int, k: int, dtype=torch.float16, launches: int = 32) -> tuple[float, float]:
    from luce_cuda.linear import CudaLinear

    role = CudaLinear()
    w0 = role.prepare(_weight(qtype, n, k, 0), torch.device("cuda"), dtype)
    wbytes = w0.w.nbytes
    copies = max(2, int(np.ceil(256e6 / wbytes)))  # > 5x the 50 MB L2 of an H100
    ws = [w0] + [role.prepare(_weight(qtype, n, k, i), torch.device("cuda"), dtype) for i in range(1, copies)]
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    outs = [torch.empty(1, n, device="cuda", dtype=dtype) for _ in range(launches)]

    def run():
        for i in range(launches):
            ws[i % copies].forward(x, out=outs[i])

    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    ms = _events_ms(g.replay) / launches
    moved = wbytes + x.nbytes + outs[0].nbytes
    return moved / ms / 1e6, ms * 1e3


def gemm_tflops(qtype: str, m: int, n: int, k: int, dtype=torch.bfloat16) -> tuple[float, float]:
    """(quantized GEMM TFLOP/s, cuBLAS TFLOP/s on the dequantized weight) for x [m, k]."""
    from luce_cuda.linear import CudaLinear

    role = CudaLinear()
    w = role.prepare(_weight(qtype, n, k, 0), torch.device("cuda"), dtype)
    dense = w.dequantize(dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ours = _events_ms(lambda: w(x))
    cublas = _events_ms(lambda: x @ dense.T)
    fl = 2 * m * n * k
    return fl / ours / 1e9, fl / cublas / 1e9


def run(a: argparse.Namespace) -> None:
    """``luce cuda gemv``."""
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs")
    cp = copy_gbps()
    print(f"device-to-device copy: {cp:.0f} GB/s (read + write)")
    print(f"{'GEMV':<8}{'N x K':>14}{'act':>6}{'us':>9}{'GB/s':>9}{'% of copy':>11}")
    for qtype in ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "NVFP4"):
        for n, k in ((2048, 8192), (8192, 2048)):
            for dt in ((torch.float16, torch.bfloat16) if qtype in ("Q4_0", "Q8_0") else (torch.float16,)):
                gbs, us = gemv_gbps(qtype, n, k, dt)
                act = DTYPE_NAMES[dt]
                print(f"{qtype:<8}{f'{n}x{k}':>14}{act:>6}{us:>9.2f}{gbs:>9.0f}{100 * gbs / cp:>10.0f}%")
    for qtype, n, k in (("Q4_1", 576, 576), ("Q4_1", 1536, 576), ("Q4_1", 576, 1536), ("Q8_0", 49152, 576)):
        gbs, us = gemv_gbps(qtype, n, k)  # SmolLM2-135M shapes
        print(f"{qtype:<8}{f'{n}x{k}':>14}{'f16':>6}{us:>9.2f}{gbs:>9.0f}{100 * gbs / cp:>10.0f}%")
    print(f"{'GEMM':<8}{'M x N x K':>20}{'ours TFLOP/s':>14}{'cuBLAS dense':>14}")
    for qtype in ("Q4_0", "Q8_0"):
        for m in (512, 2048):
            ours, ref = gemm_tflops(qtype, m, 8192, 2048)
            print(f"{qtype:<8}{f'{m}x8192x2048':>20}{ours:>14.1f}{ref:>14.1f}")


def main(argv: list[str] | None = None) -> int:
    return harness.main(argv, "luce_tools.cuda.bench_gemv", add_gemv_arguments, run)


if __name__ == "__main__":
    raise SystemExit(main())

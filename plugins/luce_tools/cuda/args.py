"""The command line of the CUDA profilers (``luce cuda profile|gemv``). Light to import: the
profilers themselves (torch, the CUDA backend) load only when one runs."""
from __future__ import annotations

import argparse


def rows(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 32:
        raise argparse.ArgumentTypeError("must be 1..32")
    return n


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Where a decode step's GPU time goes, on a CUDA machine."
    p.add_argument("model")
    p.add_argument("--depth", type=int, default=512, help="context tokens before the profiled steps")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--rows", type=rows, default=1, help="tokens per step: 1 decode, 2..32 a speculative verify")


def add_gemv_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Quick bandwidth figures for the decode GEMV (and the prefill GEMM), on a CUDA machine."

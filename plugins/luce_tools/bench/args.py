"""Arguments of ``luce bench`` (kept apart so the parser builds without importing the bench)."""
from __future__ import annotations

import argparse

from luce_core.plugin_api import DEFAULT_BUDGET, budget_arg


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pp", default="512", help="prompt lengths to time, comma-separated (default %(default)s)")
    p.add_argument("--tg", type=int, default=128, help="tokens to generate for decode timing (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported (default %(default)s)")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--check-baseline", metavar="FILE", nargs="?", const="bench/baseline.json",
                   help="compare with a perf baseline and fail on regressions")
    p.add_argument("--draft-budget", type=budget_arg, default=DEFAULT_BUDGET, help="with --drafter: drafts per step (default %(default)s)")
    p.add_argument("--draft-model", help="with --drafter draft-model/dflash: its file")
    p.add_argument("--draft-tree", action="store_true",
                   help="with --drafter: verify draft trees (DDTree; --draft-budget counts tree nodes)")
    p.add_argument("--spec-tokens", type=int, default=128,
                   help="with --drafter: tokens generated per prompt of each prompt set (default %(default)s)")
    p.add_argument("--llama-bench", metavar="PATH",
                   help="also run llama.cpp's llama-bench on the same GGUF and report luce / llama.cpp ratios "
                        "(default: $LUCE_LLAMA_BENCH when set)")
    p.add_argument("--kv-sweep", metavar="K/V,...",
                   help="decode tok/s and KV memory per KV dtype pair instead, e.g. f16/f16,q8_0/q8_0,q4_0/q4_0")
    p.add_argument("--kv-depths", default="4096,16384",
                   help="with --kv-sweep: context depths to decode at (default %(default)s)")

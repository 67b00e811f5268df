"""Arguments of ``luce bench`` (kept apart so the parser builds without importing the bench)."""
from __future__ import annotations

import argparse
from importlib.resources import files

from luce_core.plugin_api import DEFAULT_BUDGET, ConfigError, budget_arg

# the perf baseline ships with the package, so --check-baseline works from any directory
PACKAGED_BASELINE = str(files(__package__).joinpath("baseline.json"))


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pp", default="512", help="prompt lengths to time, comma-separated (default %(default)s)")
    p.add_argument("--tg", type=int, default=128, help="tokens to generate for decode timing (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported (default %(default)s)")
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--check-baseline", metavar="FILE", nargs="?", const=PACKAGED_BASELINE,
                   help="compare with a perf baseline and fail on regressions (default FILE: the baseline "
                        "shipped with luce_tools.bench)")
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


def _positive_ints(flag: str, text: str, *, empty: bool) -> None:
    parts = [x for x in str(text).split(",") if x.strip()]
    if not all(x.strip().isdecimal() and int(x) >= 1 for x in parts) or not (parts or empty):
        raise ConfigError(f"{flag} takes positive integers, comma-separated, got {text!r}",
                          remedy=f"e.g. {flag} 512,4096")


def check_bench_args(a: argparse.Namespace) -> None:
    """What the parser cannot check, before any model loads (a bad value would otherwise fail
    after minutes of benchmarking, or as a traceback)."""
    if a.reps < 1:
        raise ConfigError(f"--reps must be 1 or more, got {a.reps}", remedy="pass --reps 3, say (the median is reported)")
    if a.tg < 0:
        raise ConfigError(f"--tg must be 0 or more (0: no decode timing), got {a.tg}", remedy="pass --tg 128, say")
    if a.spec_tokens < 1:
        raise ConfigError(f"--spec-tokens must be 1 or more, got {a.spec_tokens}", remedy="pass --spec-tokens 128, say")
    if a.kv_sweep:
        if a.tg < 1:
            raise ConfigError("--kv-sweep times decoding: --tg must be 1 or more", remedy="pass --tg 128, say")
        _positive_ints("--kv-depths", a.kv_depths, empty=False)
        if a.check_baseline:
            raise ConfigError("--check-baseline compares a plain benchmark, not a --kv-sweep",
                              remedy="drop --check-baseline or --kv-sweep")
    else:
        _positive_ints("--pp", a.pp, empty=True)  # none: decode timing only

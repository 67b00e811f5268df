"""The ``luce`` subcommands of luce's tools, added through the ``register_commands`` hook.

Building them imports only the argument definitions; a tool's own module (numpy, torch) loads
when its command runs. Every command runs under the shared harness (errors, exit codes).
"""
from __future__ import annotations

import argparse
from typing import Callable

from luce_core.plugin_api import hookimpl
from luce_tools.harness import command

AddArguments = Callable[[argparse.ArgumentParser], None]


def _add(subparsers: argparse._SubParsersAction, name: str, help: str, add_arguments: AddArguments,
         target: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help, description=help)
    add_arguments(p)
    p.set_defaults(func=command(target))
    return p


def _group(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    p = subparsers.add_parser(name, help=help, description=help)
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from luce_core.plugin_api import run_flags
    from luce_tools.bench.args import add_bench_args
    from luce_tools.cuda.args import add_gemv_arguments, add_profile_arguments
    from luce_tools.models.args import add_synth_arguments, add_truncate_arguments, add_widen_arguments
    from luce_tools.quality.args import add_kv_arguments, add_weights_arguments
    from luce_tools.train_drafter.train import add_arguments as add_train_arguments

    bench = _add(subparsers, "bench", "benchmark prefill/decode; JSON out", add_bench_args, "luce_tools.bench.run:main")
    run_flags(bench)  # the model and run flags of `luce generate`
    _add(subparsers, "train-drafter", "distill a DFlash drafter from a target's own greedy generations",
         add_train_arguments, "luce_tools.train_drafter.train:main")

    model = _group(subparsers, "model", "write benchmark models (GGUF)")
    _add(model, "synth", "a GGUF with random weights (llama / qwen2 / qwen3)", add_synth_arguments,
         "luce_tools.models.synth:run")
    _add(model, "widen", "a trained GGUF padded to a larger shape that computes the same tokens",
         add_widen_arguments, "luce_tools.models.widen:run")
    _add(model, "truncate", "some of a GGUF's layers (a self-draft model)", add_truncate_arguments,
         "luce_tools.models.truncate:run")

    quality = _group(subparsers, "quality", "quality of quantized KV caches and repacked weights; JSON out")
    _add(quality, "kv", "quantized KV caches against an f16 cache", add_kv_arguments, "luce_tools.quality.kv:run")
    _add(quality, "weights", "NVFP4-repacked weights against the source weights", add_weights_arguments,
         "luce_tools.quality.weights:run")

    cuda = _group(subparsers, "cuda", "CUDA profilers (need an NVIDIA GPU)")
    _add(cuda, "profile", "where a decode step's GPU time goes", add_profile_arguments,
         "luce_tools.cuda.profile_decode:run")
    _add(cuda, "gemv", "bandwidth of the decode GEMV and the prefill GEMM", add_gemv_arguments,
         "luce_tools.cuda.bench_gemv:run")

"""The command line of the quality checks (``luce quality kv|weights``). Light to import: the
checks themselves (torch) load only when one runs."""
from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser, tokens: int, device: str) -> None:
    p.add_argument("--model", help="GGUF (default: the embedded SmolLM2)")
    p.add_argument("--tokens", type=int, default=tokens, help="tokens of the reference text (default %(default)s)")
    p.add_argument("--device", default=device, help="default %(default)s")
    p.add_argument("--out", help="write the JSON result here too")


def add_kv_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Quality of quantized KV caches, measured against an f16 cache on the same model and text."
    _common(p, 2048, "auto")
    p.add_argument("--no-needle", action="store_true", help="skip the needle-in-a-haystack check")


def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Quality of NVFP4-repacked weights (--weights nvfp4), measured against the source "
                     "weights.")
    _common(p, 1024, "cpu")

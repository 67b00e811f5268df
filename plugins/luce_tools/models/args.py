"""The command line of the model writers (``luce model synth|widen|truncate``): their arguments
and the names they accept (shape presets, file types). Light to import: ``luce`` reads it while
building its parser; the writers themselves (numpy) load only when one runs."""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from luce_core.plugin_api import ConfigError

SYNTH_PRESETS: dict[str, dict[str, Any]] = {
    # The benchmark model of DESIGN.md: Llama-3.2-1B-like body with SmolLM2's vocabulary.
    "llama-1.2b": dict(arch="llama", hidden=2048, n_layers=16, ffn=8192, n_heads=32, n_kv_heads=8,
                       head_dim=64, vocab=49152),
}
WIDEN_PRESETS: dict[str, dict[str, int]] = {
    # SmolLM2-135M's 30 layers at a 1.2B shape: 30 x 35.7 M + a 49152 x 2048 tied embedding = 1.17 B.
    "smollm2-1.2b": dict(hidden=2048, ffn=4096, n_heads=32, n_kv_heads=8),
}
# the matrix types synth writes, with the GGUF general.file_type each stands for
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q4_K": "MOSTLY_Q4_K_M", "Q6_K": "MOSTLY_Q6_K",
              "NVFP4": "MOSTLY_NVFP4"}
WIDEN_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def preset_shape(a: argparse.Namespace, presets: dict[str, dict[str, Any]], keys: Sequence[str],
                 required: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``--preset`` shape with the shape flags given (``keys``) on top; all of ``required``
    (default: every key) must be known."""
    shape = dict(presets[a.preset]) if a.preset else {}
    shape.update({k: getattr(a, k) for k in keys if getattr(a, k) is not None})
    missing = [k for k in (keys if required is None else required) if k not in shape]
    if missing:
        flags = ", ".join("--" + k.removeprefix("n_").replace("_", "-") for k in missing)
        raise ConfigError(f"the model shape lacks {flags}", remedy=f"give --preset or {flags}")
    return shape


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Write a GGUF with random weights (llama / qwen2 / qwen3)."
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--preset", choices=sorted(SYNTH_PRESETS), help="model shape preset")
    p.add_argument("--arch", help="architecture, one that luce_gguf runs (default: the preset's, else llama)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int, dest="n_layers")
    p.add_argument("--heads", type=int, dest="n_heads")
    p.add_argument("--kv-heads", type=int, dest="n_kv_heads")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--qtype", default="F32", choices=sorted(FILE_TYPES))
    p.add_argument("--embed-qtype", choices=sorted(FILE_TYPES))
    p.add_argument("--untied", action="store_true", help="write a separate output.weight")
    p.add_argument("--tokenizer-from", help="copy tokenizer metadata from this GGUF (vocab = its size)")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--rope-base", type=float, default=10000.0)
    p.add_argument("--outlier-channels", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    _quiet(p)


def add_widen_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Pad a GGUF model to a larger shape that computes the same tokens (a benchmark target "
                     "that behaves like a trained model).")
    p.add_argument("src", help="the GGUF to widen")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--preset", choices=sorted(WIDEN_PRESETS), help="target shape preset")
    p.add_argument("--hidden", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--heads", type=int, dest="n_heads")
    p.add_argument("--kv-heads", type=int, dest="n_kv_heads")
    p.add_argument("--qtype", choices=WIDEN_QTYPES,
                   help="re-store every matrix in this type (default: keep each tensor's own)")
    _quiet(p)


def add_truncate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Keep some layers of a GGUF model (a self-draft model that shares its tokenizer, "
                     "for --drafter draft-model).")
    p.add_argument("src", help="the GGUF to cut")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--layers", required=True, help="layers to keep, e.g. 0-7 or 0-5,28,29")
    _quiet(p)

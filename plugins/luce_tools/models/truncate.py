"""Keep some of a GGUF model's layers: a self-draft for speculative decoding (layer skipping).

A draft model must share the target's tokenizer. SmolLM2-135M is the smallest of its family, so
nothing smaller drafts for it; its own first layers (plus its final norm and head) can. The
result computes exactly what the original computes with the other layers' residual updates
left out, and is written with the original's tokenizer, metadata and tensors (raw blocks, bits
unchanged), layers renumbered. CLI (also ``python -m luce_tools.models.truncate``)::

    luce model truncate SmolLM2-135M-Instruct.Q4_1.gguf smollm2-draft-8.gguf --layers 0-7
"""
from __future__ import annotations

import argparse
import os
import re

import numpy as np

from luce_core.plugin_api import ConfigError
from luce_gguf.arch import model_config
from luce_gguf.reader import open_gguf
from luce_tools import harness
from luce_tools.models.args import add_truncate_arguments
from luce_tools.models.writer import StreamWriter

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``"0-7,29"`` -> [0, 1, ..., 7, 29]: sorted, distinct, each in [0, n_layers)."""
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError(f"cannot read layer list {spec!r}", remedy="write layers as e.g. 0-7 or 0-5,28,29")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if lo > hi or hi >= n_layers:
            raise ConfigError(f"layers {part.strip()!r} are not within the model's 0..{n_layers - 1}",
                              remedy=f"pick layers between 0 and {n_layers - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def truncate_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], layers: str | list[int],
                  progress: bool = False) -> list[int]:
    """Write ``dst``: ``src`` with only ``layers`` (original indices, in order, or a ``parse_layers``
    spec such as ``"0-7"``), renumbered 0..; returns the layers kept."""
    f = open_gguf(src)
    cfg = model_config(f)
    if isinstance(layers, str):
        layers = parse_layers(layers, cfg.n_layers)
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= cfg.n_layers:
        raise ConfigError(f"layers {layers} are not a sorted, non-empty subset of 0..{cfg.n_layers - 1}")
    renumber = {old: new for new, old in enumerate(layers)}
    out = StreamWriter(dst, cfg.arch)
    for key in f.keys():
        if not key.startswith("GGUF."):
            out.copy_key(f, key)
    out.add(f"{cfg.arch}.block_count", len(layers))
    out.add("general.name", f"{f.get('general.name', 'model')} layers {','.join(map(str, layers))}")
    out.add("luce.truncated_from", os.path.basename(os.fspath(src)))
    for name in f.tensors:
        m = _BLOCK.match(name)
        if m and int(m[1]) not in renumber:
            continue
        q = f.qtensor(name)
        new = f"blk.{renumber[int(m[1])]}.{m[2]}" if m else name
        out.add_tensor(new, q.shape, q.qtype, lambda q=q: np.asarray(q.data))
    out.write(progress=progress, desc=os.path.basename(os.fspath(dst)))
    return layers


def run(a: argparse.Namespace) -> None:
    """``luce model truncate``."""
    layers = truncate_gguf(a.src, a.out, a.layers, progress=not a.quiet)
    harness.wrote(a.out, f"{len(layers)} layers, {os.path.getsize(a.out) / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    return harness.main(argv, "luce_tools.models.truncate", add_truncate_arguments, run)


if __name__ == "__main__":
    raise SystemExit(main())

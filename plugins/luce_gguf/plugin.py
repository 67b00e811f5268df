"""Descriptor of the GGUF loader (imports nothing heavy: the claim reads 4 bytes with open())."""
from __future__ import annotations

import os

from luce_core.plugin_api import CONTRACT_VERSION, Caps, Impl, RunConfig, hookimpl

GGUF_MAGIC = b"GGUF"


def gguf_claim_reasons(path: str) -> list[str]:
    """Why ``path`` is not a GGUF this loader can open (empty list: it claims it)."""
    if not path:
        return ["no model path given"]
    if not os.path.exists(path):
        return [f"file not found: {path}"]
    if os.path.isdir(path):
        return [f"a directory, not a model file: {path}"]
    if not os.path.isfile(path):
        return [f"not a regular file: {path}"]
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return [f"cannot read {path}: {e.strerror or e}"]
    if not magic:
        return ["the file is empty (0 bytes)"]
    if magic != GGUF_MAGIC:
        return [f"not a GGUF file (it starts with {magic!r}, a GGUF with {GGUF_MAGIC!r})"]
    return []


def _loader_requires(caps: Caps, config: RunConfig) -> list[str]:
    return gguf_claim_reasons(str(config.model_path))


@hookimpl
def provide_loader() -> list[Impl]:
    return [Impl("loader", "gguf", "luce_gguf.loader:GGUFLoader", priority=0,
                 requires=_loader_requires,
                 summary="GGUF v2/v3 via memory map (llama, qwen2, qwen3; tensors kept in stored format)",
                 contract=CONTRACT_VERSION)]

"""The GGUF loader role: a memory-mapped GGUF -> LoadedModel (config, tokenizer, stored tensors)."""
from __future__ import annotations

import collections
import math
import os
from typing import TYPE_CHECKING, Any

from luce_core.plugin_api import LoadedModel, LuceError, ModelFileError, QTensor
from luce_core.formats.blocks import SUPPORTED
from luce_gguf.arch import model_config, validate
from luce_gguf.reader import GGUFFile, fingerprint, open_gguf
from luce_gguf.tokenizer import GGUFTokenizer

if TYPE_CHECKING:
    from luce_core.plugin_api import Caps
    from luce_core.plugin_api import RunConfig

# ggml's NVFP4 keeps the FP32 per-tensor scale in a sibling tensor; input_scale (activations) is
# not needed for weight-only inference.
_SIDECARS = (".scale", ".input_scale")


def _sidecar_of(name: str, tensors: dict[str, Any]) -> str | None:
    for suffix in _SIDECARS:
        if name.endswith(suffix) and name[: -len(suffix)] in tensors:
            return name[: -len(suffix)]
    return None


def _per_tensor_scale(f: GGUFFile, name: str) -> float:
    scale_name = name + ".scale"
    if scale_name not in f.tensors:
        if f.qtype(name) == "NVFP4":
            raise ModelFileError(f"{f.path}: NVFP4 tensor {name} has no {scale_name} (its per-tensor scale)",
                                 remedy="re-convert the model with a llama.cpp converter that writes NVFP4 scales")
        return 1.0
    rt = f.tensors[scale_name]
    if rt.tensor_type.name != "F32" or int(rt.n_elements) != 1:
        raise ModelFileError(f"{f.path}: tensor {scale_name} must be one F32 value, got {rt.tensor_type.name} "
                             f"with {int(rt.n_elements)} elements", remedy="the file is corrupt")
    return float(rt.data.reshape(-1)[0])


def _metadata(f: GGUFFile, tensors: dict[str, QTensor]) -> dict[str, Any]:
    import gguf

    file_type = f.get("general.file_type", None)
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name if file_type is not None else ""
    except ValueError:
        file_type_name = f"unknown({file_type})"
    counts = collections.Counter(t.qtype for t in tensors.values())
    n_params = sum(math.prod(t.shape) for t in tensors.values())
    return {
        "name": f.get("general.name", ""),
        "arch": f.get("general.architecture"),
        "file_type": file_type_name,
        "file_type_id": file_type,
        "gguf_version": f.get("GGUF.version", None),
        "quantization_version": f.get("general.quantization_version", None),
        "size_label": f.get("general.size_label", ""),
        "file_size": f.size,
        "n_params": n_params,
        "weight_bytes": sum(t.nbytes for t in tensors.values()),
        "tensor_types": dict(sorted(counts.items())),
        "tokenizer_model": f.get("tokenizer.ggml.model", ""),
        "tokenizer_pre": f.get("tokenizer.ggml.pre", ""),
        "has_chat_template": f.has("tokenizer.chat_template"),
    }


def load_gguf(path: str | os.PathLike[str]) -> LoadedModel:
    """Open, validate and describe a GGUF model; tensors stay views of the memory map."""
    f = open_gguf(path)
    cfg = model_config(f)
    needed = validate(f, cfg)
    tensors: dict[str, QTensor] = {}
    ignored: list[str] = []
    for name in f.tensors:
        if _sidecar_of(name, f.tensors) is not None:
            continue
        if name not in needed and f.qtype(name) not in SUPPORTED:
            ignored.append(name)  # an extra tensor the graph never reads need not be readable
            continue
        qt = f.qtensor(name)  # UnsupportedModelError naming the tensor for unreadable types
        scale = _per_tensor_scale(f, name)
        tensors[name] = qt if scale == 1.0 else QTensor(qt.name, qt.qtype, qt.shape, qt.data, scale)
    tokenizer = GGUFTokenizer(f.get, f.path)
    if tokenizer.vocab_size > cfg.vocab:
        raise ModelFileError(f"{f.path}: the tokenizer has {tokenizer.vocab_size} tokens but token_embd.weight "
                             f"only {cfg.vocab} rows", remedy="the file is corrupt or mis-converted")
    meta = _metadata(f, tensors)
    if ignored:
        meta["ignored_tensors"] = ignored
    return LoadedModel(path=f.path, config=cfg, tokenizer=tokenizer, tensors=tensors,
                       metadata=meta, fingerprint=fingerprint(f))


class GGUFLoader:
    """Factory object of the ``gguf`` loader implementation."""

    def __init__(self, caps: "Caps | None" = None, config: "RunConfig | None" = None):
        self.caps = caps
        self.config = config

    def load(self, path: str | os.PathLike[str], config: "RunConfig | None" = None) -> LoadedModel:
        try:
            return load_gguf(path)
        except (LuceError, MemoryError):
            raise
        except Exception as e:  # a damage the checks missed: still names the file (cause chained)
            raise ModelFileError(f"{os.fspath(path)}: cannot load the model: the file is inconsistent in a way "
                                 "luce does not check for",
                                 remedy="re-download or re-convert it; if it loads elsewhere, report it to luce") from e

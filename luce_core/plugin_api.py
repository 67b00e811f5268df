"""The plugin surface: everything a luce plugin (backend, loader, drafter, tool) may import.

    from luce_core.plugin_api import Impl, hookimpl, ConfigError, KVSpec, ...

Plugins import this module and the pure codecs of ``luce_core.formats``, nothing else of the
core (``tests/test_layers.py`` enforces it). Importing it is cheap: the contract (descriptors,
hooks, data types, protocols, errors) loads at once, torch-backed runtime services load on
first attribute access, so a ``plugin.py`` that imports ``Impl`` and ``hookimpl`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

from luce_core.contract import CONTRACT_VERSION
from luce_core.contract.drafting import Drafter, DrafterOptions, DraftRequest, Proposal, Target
from luce_core.contract.errors import (ConfigError, ContextOverflowError, DeviceMemoryError, KernelError, LuceError,
                                       ModelFileError, PluginError, SelectionError, SnapshotError,
                                       UnsupportedModelError)
from luce_core.contract.hookspecs import hookimpl
from luce_core.contract.impl import ROLES, Impl
from luce_core.contract.kv_layout import DENSE_V1, KVTensors
from luce_core.contract.layer_ops import LayerOps
from luce_core.contract.roles import (OPTIONAL, Attention, ChunkSelector, KVStorage, KVStore, Linear, Loader,
                                      optional)
from luce_core.contract.types import KVSpec, LoadedModel, ModelConfig, QTensor, Tokenizer

# name -> module of the runtime services plugins use, imported on first access (they need torch)
_LAZY: dict[str, str] = {
    # machine and configuration
    "Caps": "luce_core.caps", "probe": "luce_core.caps",
    "RunConfig": "luce_core.config", "KV_DTYPES": "luce_core.config", "DEFAULT_KV": "luce_core.config",
    "DEFAULT_BUDGET": "luce_core.config", "budget_arg": "luce_core.config",
    "cache_dir": "luce_core.default_model", "default_model_path": "luce_core.default_model",
    "host": "luce_core.plugin_host", "forced_name": "luce_core.selection",
    # commands that load a model take `luce generate`'s flags (register_commands)
    "run_flags": "luce_core.cli", "run_overrides": "luce_core.cli",
    # running a model (drafters with a model of their own, tools)
    "Plan": "luce_core.plan", "build": "luce_core.plan",
    "Transformer": "luce_core.model", "ForwardOut": "luce_core.model",
    "Session": "luce_core.session", "common_prefix": "luce_core.session", "sync": "luce_core.session",
    "generate": "luce_core.generate", "PlainStepper": "luce_core.generate", "Stats": "luce_core.generate",
    "TorchLayerOps": "luce_core.layer_ops", "TORCH_LAYER_OPS": "luce_core.layer_ops", "rms_norm": "luce_core.layer_ops",
    "rope_tables": "luce_core.rope", "apply_rope": "luce_core.rope", "inv_frequencies": "luce_core.rope",
    "capture_graph": "luce_core.graphs", "rows_exact": "luce_core.row_exact",
    "KVLayout": "luce_core.formats.kv_snapshot", "KVSnapshot": "luce_core.formats.kv_snapshot",
    # sampling and speculative decoding
    "SamplingParams": "luce_core.sampling", "Sampler": "luce_core.sampling",
    "probabilities": "luce_core.sampling", "apply_repetition_penalty": "luce_core.sampling",
    "target_choice": "luce_core.speculative.accept", "target_distribution": "luce_core.speculative.accept",
    "SpecStats": "luce_core.speculative.stats", "SpeculativeStepper": "luce_core.speculative.stepper",
    "make_drafter": "luce_core.speculative.wiring", "stepper_for": "luce_core.speculative.wiring",
    "FeatureMirror": "luce_core.feature_mirror",
    "DraftTree": "luce_core.speculative.tree", "TreeMask": "luce_core.speculative.tree",
    "trie_tree": "luce_core.speculative.tree", "chain_tree": "luce_core.speculative.tree",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"luce_core.plugin_api has no {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CONTRACT_VERSION", "Impl", "ROLES", "hookimpl", "DENSE_V1", "KVTensors",
    "Attention", "ChunkSelector", "Drafter", "KVStorage", "KVStore", "LayerOps", "Linear", "Loader",
    "OPTIONAL", "optional",
    "DraftRequest", "DrafterOptions", "KVSpec", "LoadedModel", "ModelConfig", "Proposal", "QTensor", "Target",
    "Tokenizer",
    "ConfigError", "ContextOverflowError", "DeviceMemoryError", "KernelError", "LuceError", "ModelFileError",
    "PluginError", "SelectionError", "SnapshotError", "UnsupportedModelError",
    *_LAZY,
]

"""The roles, as pluggy hook specifications.

Every hook takes no arguments and returns a list of :class:`luce_core.contract.impl.Impl` descriptors for
its role. Probing, ranking and construction happen in the core (``luce_core.selection``), never
inside a hook, so a plugin that cannot run here still shows up in ``luce doctor`` with its
reasons. The object each factory builds follows the protocol of its role in
``luce_core.contract.roles``.
"""
from __future__ import annotations

from typing import Any

import pluggy

from luce_core.contract.impl import Impl

PROJECT = "luce"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def provide_loader() -> list[Impl]:
    """Model loaders. A loader claims a model source in ``requires`` (returning a reason such
    as "not a GGUF file" when it does not) and its factory builds a
    :class:`luce_core.contract.roles.Loader`, whose ``load(path, config)`` returns a
    :class:`luce_core.contract.types.LoadedModel`: config, tokenizer and tensors in their stored format."""


@hookspec
def provide_linear() -> list[Impl]:
    """Linear layers ``y = x @ W.T`` for weight formats (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K/
    NVFP4). ``requires`` should name any tensor type of ``config.model`` it cannot read. The
    factory builds a :class:`luce_core.contract.roles.Linear`."""


@hookspec
def provide_attention() -> list[Impl]:
    """Causal GQA attention over a KV store: dense, block-sparse or with an explicit mask (tree
    verification). The factory builds a :class:`luce_core.contract.roles.Attention`."""


@hookspec
def provide_kv_storage() -> list[Impl]:
    """Per-layer, per-position K/V vectors (also the DFlash feature mirror): write, read,
    truncate, snapshot and restore, in dtypes f32/f16/bf16/q8_0/q4_0 with optional Hadamard
    K rotation. ``requires`` rejects dtype pairs it does not store. The factory builds a
    :class:`luce_core.contract.roles.KVStorage`."""


@hookspec
def provide_drafter() -> list[Impl]:
    """Draft-token proposers for speculative decoding (prompt lookup, draft model, DFlash
    block drafter). Drafters are used only when asked for (``--drafter``). The factory builds
    a :class:`luce_core.contract.roles.Drafter`."""


@hookspec
def provide_chunk_selector() -> list[Impl]:
    """Prompt compressors: choose which chunks of a long prompt to keep (PFlash style). Used
    only when asked for (``--chunk-selector``). The factory builds a
    :class:`luce_core.contract.roles.ChunkSelector`."""


HOOK_OF_ROLE: dict[str, str] = {
    "loader": "provide_loader",
    "linear": "provide_linear",
    "attention": "provide_attention",
    "kv_storage": "provide_kv_storage",
    "drafter": "provide_drafter",
    "chunk_selector": "provide_chunk_selector",
}


@hookspec
def register_commands(subparsers: Any) -> None:
    """Add ``luce`` subcommands (as simonw/llm's hook of the same name does). ``subparsers`` is
    the argparse sub-parser action of the ``luce`` parser: ``p = subparsers.add_parser(name,
    help=...)``, then ``p.set_defaults(func=run)`` where ``run(args) -> int`` is the exit code.
    Import the command's implementation inside ``run``, so building the parser stays cheap. A
    ``LuceError`` raised by ``run`` is printed without a traceback and exits 2."""

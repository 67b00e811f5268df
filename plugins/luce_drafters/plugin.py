"""Descriptors of luce_drafters (imports nothing heavy).

Drafters are used only when asked for (``--drafter NAME``); their factories build an unbound
drafter, and ``bind(target, options)`` (see ``luce_core.speculative``) checks it can serve the
target model - a missing ``--draft-model``, a tokenizer mismatch or a drafter trained for another
target is a ConfigError naming the cause.
"""
from __future__ import annotations

from luce_core.plugin_api import CONTRACT_VERSION, Impl, hookimpl


@hookimpl
def provide_drafter() -> list[Impl]:
    return [
        Impl("drafter", "prompt-lookup", "luce_drafters.prompt_lookup:PromptLookupDrafter", priority=0,
             summary="n-gram match in the context (no weights); chain or trie of matches",
             contract=CONTRACT_VERSION),
        Impl("drafter", "draft-model", "luce_drafters.draft_model:DraftModelDrafter", priority=0,
             summary="a small GGUF sharing the target's tokenizer (--draft-model), run by luce",
             contract=CONTRACT_VERSION),
        Impl("drafter", "dflash", "luce_drafters.dflash.runtime:DFlashDrafter", priority=0,
             summary="block drafter fed target hidden states (--draft-model FILE from luce train-drafter)",
             contract=CONTRACT_VERSION),
    ]

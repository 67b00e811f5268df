"""Descriptors of luce_chunks (imports nothing heavy)."""
from __future__ import annotations

from luce_core.plugin_api import CONTRACT_VERSION, Impl, hookimpl


@hookimpl
def provide_chunk_selector() -> list[Impl]:
    return [Impl("chunk_selector", "lexical", "luce_chunks.lexical:LexicalSelector", priority=0,
                 summary="anchors + IDF-weighted query-token overlap (PFlash's rare-query rescue, no drafter)",
                 contract=CONTRACT_VERSION)]

"""Incremental detokenization: emit text only once its UTF-8 bytes are complete."""
from __future__ import annotations

from luce_core.contract.types import Tokenizer


class StreamDecoder:
    """Feeds token ids, returns the new text each time it is printable.

    Decoding the whole suffix since the last emitted boundary (rather than token by token)
    keeps multi-token characters and leading-space rules right.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        new, self.emitted = text[len(self.emitted):], text
        if len(self.ids) > 64:  # bound the re-decode cost: restart from a clean boundary
            self.ids, self.emitted = [], ""
        return new

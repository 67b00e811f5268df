"""The GGUF's tokenizer rebuilt with Hugging Face ``tokenizers``: GPT-2-style byte-level BPE.

Vocabulary and merges come from ``tokenizer.ggml.tokens``/``merges``; the pre-tokenizer (how text
is split before BPE) is chosen by ``tokenizer.ggml.pre``, the name llama.cpp's converter records
for each model family. Control and user-defined tokens are matched verbatim in the text.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Mapping, Sequence

from luce_core.plugin_api import ModelFileError, UnsupportedModelError
from luce_gguf.chat import ChatTemplate
from luce_gguf.reader import echo

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list[str]: "an array of strings",
               list[int]: "an array of integers"}

# Pre-tokenizer split patterns (Oniguruma syntax, as HF tokenizers uses).
# Llama 3: contractions case-insensitively, letters with one leading non-letter, digits in runs of
# at most three, punctuation runs keeping trailing newlines, newline runs, then whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2/Qwen3: the Llama 3 pattern with every digit on its own.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre value -> pre-tokenizer family
PRE_FAMILIES: dict[str, str] = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2",
    "llama3": "llama3", "llama-bpe": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
    "qwen2": "qwen2", "qwen": "qwen2", "deepseek-r1-qwen": "qwen2",
    "smollm": "smollm",
}


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies:
    printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def pre_tokenizer(pre: str | None) -> Any:
    """The HF pre-tokenizer for a ``tokenizer.ggml.pre`` name (GPT-2's when unknown or absent)."""
    from tokenizers import Regex, pre_tokenizers

    family = PRE_FAMILIES.get(pre or "default")
    if family is None:
        warnings.warn(f"luce: unknown tokenizer.ggml.pre {pre!r}; splitting text the GPT-2 way, which may "
                      "tokenize differently from the original model", stacklevel=3)
        family = "gpt2"
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "smollm":  # every digit alone, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    pattern = LLAMA3_PATTERN if family == "llama3" else QWEN2_PATTERN
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


class GGUFTokenizer:
    """luce_core.contract.types.Tokenizer over a GGUF's byte-level BPE vocabulary."""

    def __init__(self, get: Callable[..., Any], origin: str = "model"):
        """``get(key, default)`` reads GGUF metadata (``GGUFFile.get`` or ``dict.get``)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models

        def typed(key: str, kind: type, default: Any = None) -> Any:
            """get(key), type-checked: lists item by item (a scalar where a list belongs, say)."""
            value = get(key, None)
            if value is None:
                return default
            item = kind.__args__[0] if hasattr(kind, "__args__") else None
            ok = isinstance(value, list) and all(type(v) is item for v in value) if item else (
                isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
            if not ok:
                raise ModelFileError(f"{origin}: metadata {key} is not {_KIND_NAMES[kind]}",
                                     remedy="the file is corrupt or mis-converted; re-convert it")
            return value

        model = typed("tokenizer.ggml.model", str)
        if model != "gpt2":
            raise UnsupportedModelError(
                f"{origin}: tokenizer model {echo(model)} is not supported",
                remedy="luce reads byte-level BPE tokenizers (tokenizer.ggml.model = 'gpt2': Llama 3, Qwen, "
                       "SmolLM, ...); SentencePiece ('llama') vocabularies are not supported yet")
        tokens: list[str] = typed("tokenizer.ggml.tokens", list[str], [])
        merges: list[str] = typed("tokenizer.ggml.merges", list[str], [])
        if not tokens:
            raise ModelFileError(f"{origin}: tokenizer.ggml.tokens is missing or empty",
                                 remedy="the GGUF has no vocabulary; re-convert it")
        types: list[int] = typed("tokenizer.ggml.token_type", list[int], None) or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ModelFileError(f"{origin}: {len(types)} token types for {len(tokens)} tokens",
                                 remedy="the file is corrupt")
        self.pre: str = typed("tokenizer.ggml.pre", str) or "default"
        self.tokens = tokens
        self.vocab_size = len(tokens)

        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # a few GGUFs repeat filler tokens: first id wins
        pairs = []
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep:
                raise ModelFileError(f"{origin}: malformed BPE merge {echo(m)}", remedy="the file is corrupt")
            pairs.append((left, right))
        family = PRE_FAMILIES.get(self.pre, "gpt2")
        # Llama 3 looks a whole pre-token up in the vocabulary before merging (ignore_merges).
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                         ignore_merges=family == "llama3")
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizer(self.pre)
        tok.decoder = decoders.ByteLevel()
        self.special_ids = frozenset(i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED))
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in sorted(self.special_ids)])
        self._tok = tok

        def token_id(key: str) -> int | None:
            v = typed(key, int)
            return v if v is not None and 0 <= v < len(tokens) else None

        self.bos_id: int | None = token_id("tokenizer.ggml.bos_token_id")
        eos = token_id("tokenizer.ggml.eos_token_id")
        default_bos = family == "llama3" and self.bos_id is not None
        self.add_bos: bool = typed("tokenizer.ggml.add_bos_token", bool, default_bos) and self.bos_id is not None
        ends = {eos, token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")}
        for text in ("<|im_end|>", "<|endoftext|>"):
            i = vocab.get(text)
            if i is not None and i in self.special_ids:
                ends.add(i)
        self.eos_ids: frozenset[int] = frozenset(i for i in ends if i is not None)
        self.eos_id: int | None = eos
        self.bos_token = tokens[self.bos_id] if self.bos_id is not None else ""
        self.eos_token = tokens[eos] if eos is not None else ""
        self.chat = ChatTemplate(typed("tokenizer.chat_template", str), self.bos_token, self.eos_token, origin)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], origin: str = "model") -> "GGUFTokenizer":
        return cls(meta.get, origin)

    # ------------------------------------------------------------------ protocol
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates are not text: pair what pairs, U+FFFD the rest
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        return self.chat.render(messages, add_generation_prompt=add_generation_prompt, **extra)

    # ------------------------------------------------------------------ extras
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (streaming detokenizers join these and emit whole
        UTF-8 characters); control tokens give their text."""
        text = self.tokens[token_id]
        if token_id in self.special_ids:
            return text.encode("utf-8")
        table = unicode_to_byte()
        try:
            return bytes(table[c] for c in text)
        except KeyError:  # not a byte-level piece (should not happen in a gpt2 vocabulary)
            return text.encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    @property
    def chat_template(self) -> str:
        return self.chat.source

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok


def load_tokenizer(path: str) -> GGUFTokenizer:
    """The tokenizer of the GGUF at ``path`` (without loading the weights' metadata checks)."""
    from luce_gguf.reader import open_gguf

    f = open_gguf(path)
    return GGUFTokenizer(f.get, f.path)

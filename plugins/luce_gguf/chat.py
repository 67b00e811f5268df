"""Chat templates: the GGUF's Jinja template rendered the way Hugging Face renders it.

Same environment options as transformers (sandboxed, ``trim_blocks``/``lstrip_blocks``,
``loopcontrols``, a ``tojson`` that keeps non-ASCII, ``raise_exception`` and ``strftime_now``
globals, and a no-op ``{% generation %}`` block) so a template gives the same text here and there.
"""
from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Mapping, Sequence

from luce_core.plugin_api import ConfigError, ModelFileError

# Used when the GGUF carries no template: ChatML, the format most small instruct models use.
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ConfigError):
    """The chat template rejected the messages (``raise_exception`` in the template)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}", remedy="change the messages to what the model's template accepts")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}…{% endgeneration %}`` marks assistant text for training masks in
        HF; rendering just emits the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> list[Any]:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return [nodes.Scope(body, lineno=lineno)]

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    return _environment().from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", origin: str = ""):
        self.source = source or DEFAULT_CHATML
        self.is_default = not source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _compile(self.source)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise ModelFileError(f"{origin or 'model'}: tokenizer.chat_template does not compile ({e})",
                                 remedy="fix the template in the GGUF metadata") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text for ``messages`` (dicts with role/content); ``extra`` (e.g. tools)
        is passed to the template as variables."""
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra}
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError:
            raise
        except Exception as e:
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}",
                                remedy="check the messages (role/content dicts) against the model's template") from None

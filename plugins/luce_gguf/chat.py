"""Chat templates: the GGUF's Jinja template rendered the way Hugging Face renders it.

Same environment options as transformers (sandboxed, ``trim_blocks``/``lstrip_blocks``,
``loopcontrols``, a ``tojson`` that keeps non-ASCII, ``raise_exception`` and ``strftime_now``
globals, and a no-op ``{% generation %}`` block) so a template gives the same text here and there.
"""
from __future__ import annotations

import datetime
import functools
import json
import sys
import time
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


MAX_OUTPUT = 8 << 20  # characters a template may render (or build in one string/list operation)
TIME_LIMIT_S = 2.0  # a real chat template renders in milliseconds


class _OverBudget(Exception):
    pass


def _check_size(n: int) -> None:
    if n > MAX_OUTPUT:
        raise _OverBudget(f"builds a value of {n} items (at most {MAX_OUTPUT})")


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
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

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox (no attribute escapes, no mutation of the caller's data, range() at most
        100k items) plus bounds on values a template builds with ``*``, ``+`` and ``**``."""

        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            sized = (str, list, tuple)
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, sized) and isinstance(n, int):
                        _check_size(len(seq) * max(n, 0))
            elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
                _check_size(len(left) + len(right))
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                _check_size(right)  # bits of the result grow with the exponent
            return super().call_binop(context, operator, left, right)

        def bounded_concat(self, parts: tuple[Any, ...]) -> str:
            texts = [str(p) for p in parts]
            _check_size(sum(map(len, texts)))
            return "".join(texts)

    class BoundedCodeGenerator(CodeGenerator):
        """``a ~ b`` (which the sandbox does not intercept) through bounded_concat."""

        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    BoundedEnvironment.code_generator_class = BoundedCodeGenerator
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class _Deadline:
    """A trace function that stops the rendering thread's Python code after TIME_LIMIT_S (loops
    in a template are Python loops; a C-level blow-up is bounded by BoundedEnvironment)."""

    def __init__(self) -> None:
        self.end = time.monotonic() + TIME_LIMIT_S

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > self.end:
            raise _OverBudget(f"ran longer than {TIME_LIMIT_S:g} s")
        return self


def _render_bounded(template: Any, variables: dict[str, Any]) -> str:
    chunks, size = [], 0
    previous = sys.gettrace()
    sys.settrace(_Deadline())
    try:
        for chunk in template.generate(**variables):
            size += len(chunk)
            _check_size(size)
            chunks.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(chunks)


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
            raise ModelFileError(f"{origin or 'model'}: tokenizer.chat_template does not compile "
                                 f"({str(e)[:200]})",
                                 remedy="fix the template in the GGUF metadata") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text for ``messages`` (dicts with role/content); ``extra`` (e.g. tools)
        is passed to the template as variables."""
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
                     "messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt}
        try:
            return _render_bounded(self._template, variables)
        except TemplateError:
            raise
        except _OverBudget as e:
            raise TemplateError(f"the model's chat template {e}; it is broken or hostile",
                                remedy="pass a plain prompt without --chat, or fix tokenizer.chat_template in "
                                       "the GGUF") from None
        except MemoryError:
            raise TemplateError("the model's chat template ran out of memory; it is broken or hostile",
                                remedy="pass a plain prompt without --chat, or fix tokenizer.chat_template in "
                                       "the GGUF") from None
        except Exception as e:  # jinja2 errors (undefined names, sandbox refusals) or bad message data
            raise TemplateError(f"the model's chat template failed on these messages: {str(e)[:200]}",
                                remedy="messages must be role/content dicts; if they are, the template is at "
                                       "fault: fix tokenizer.chat_template in the GGUF or pass a plain prompt") from None

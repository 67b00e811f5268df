"""Chat templates run sandboxed, under a time and a size limit, and blame the template."""
from __future__ import annotations

import time

import pytest

from luce_gguf import chat
from luce_gguf.chat import ChatTemplate, TemplateError

HI = [{"role": "user", "content": "hi"}]


def test_environment_is_the_immutable_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    assert isinstance(chat._environment(), ImmutableSandboxedEnvironment)
    with pytest.raises(TemplateError, match="template"):  # no attribute escapes
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(HI)
    with pytest.raises(TemplateError):  # the caller's data stays unmodified
        ChatTemplate("{{ messages.append(1) }}").render(HI)


def test_default_template_renders():
    assert ChatTemplate(None).render(HI) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("source", [
    "{{ 'x' * 10**10 }}",
    "{{ [1] * 10**9 }}",
    "{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{{ 7 ** 100000000 }}",
    "{% for i in range(100000) %}{% for j in range(1000) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
])
def test_size_bombs_fail_fast(source):
    start = time.monotonic()
    with pytest.raises(TemplateError, match="chat template .*(builds a value|ran longer)") as info:
        ChatTemplate(source).render(HI)
    assert time.monotonic() - start < chat.TIME_LIMIT_S + 1.5
    assert "the GGUF" in str(info.value) and "messages" not in info.value.message


def test_time_bomb_stops_at_the_limit(monkeypatch):
    monkeypatch.setattr(chat, "TIME_LIMIT_S", 0.3)
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(TemplateError, match="ran longer than 0.3 s"):
        ChatTemplate(source).render(HI)
    assert time.monotonic() - start < 2


def test_a_template_error_names_the_template():
    with pytest.raises(TemplateError, match="chat template failed on these messages") as info:
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(HI)
    assert "TypeError" not in str(info.value) and "template is at fault" in str(info.value)

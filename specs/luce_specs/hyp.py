"""Hypothesis settings shared by the spec suites: no deadline (first calls compile or warm up
kernels), and an example count a plugin author can raise for a long soak or lower for a smoke
run (``luce specs --max-examples N`` or env LUCE_SPECS_MAX_EXAMPLES)."""
from __future__ import annotations

import os

from hypothesis import settings

from luce_core.plugin_api import ConfigError
from luce_specs import MAX_EXAMPLES_ENV as ENV


def spec_settings(max_examples: int) -> settings:
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            max_examples = int(raw)
        except ValueError:
            max_examples = 0
        if max_examples < 1:
            raise ConfigError(f"{ENV}={raw!r} is not a positive integer", remedy=f"unset {ENV} or set e.g. {ENV}=10")
    return settings(max_examples=max_examples, deadline=None)

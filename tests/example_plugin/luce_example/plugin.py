"""What luce imports at start-up: descriptors only (no torch, no probing).

luce calls ``provide_linear`` to learn that ``example-f32`` exists, asks ``requires`` whether it
can run here, and imports ``luce_example.linear`` only if it is selected.
"""
from __future__ import annotations

import os

from luce_core.plugin_api import CONTRACT_VERSION, Caps, Impl, RunConfig, hookimpl
from luce_core.formats.blocks import SUPPORTED

ENABLE = "LUCE_EXAMPLE_ENABLE"


def _requires(caps: Caps, config: RunConfig) -> list[str]:
    """Reasons it cannot run; empty means it can. Each reason says what would fix it."""
    reasons = []
    if os.environ.get(ENABLE) != "1":
        reasons.append(f"disabled: set {ENABLE}=1 to use the example plugin")
    unknown = sorted(set(config.weight_types) - set(SUPPORTED))
    if unknown:
        reasons.append(f"cannot read tensor type(s) {', '.join(unknown)}")
    return reasons


@hookimpl
def provide_linear() -> list[Impl]:
    # priority 100 beats the torch reference (0): once enabled, it is the default choice
    return [Impl("linear", "example-f32", "luce_example.linear:ExampleLinear", priority=100,
                 requires=_requires, summary="dequantize to float32 once, then a float32 matmul",
                 contract=CONTRACT_VERSION)]  # the contract version it was built against

"""What the user asked for in one run: the input of selection and planning."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import attrs

from luce_core.contract.errors import ConfigError

# Chain drafts per step unless the user sets a budget: the pending token and 7 drafts are 8 verify
# rows, one chunk of luce_cuda's few-row GEMV; a budget of 8 makes 9 rows, two launches per matmul.
# On an H200 (SmolLM2, prompt lookup, code prompts) the verify step took 1.75 ms at budget 8 and
# 1.58 ms at budget 7 in the sixth session (bench/results/README.md has the later runs).
DEFAULT_BUDGET = 7


def budget_arg(text: str) -> int:
    """argparse type of --draft-budget: a bad value stops the command before any model loads."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n

if TYPE_CHECKING:
    from luce_core.contract.types import ModelConfig

COMPUTE_DTYPES = ("auto", "f32", "f16", "bf16")
KV_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
FEATURE_DTYPES = ("f32", "f16", "bf16", "q8_0")
WEIGHT_FORMATS = ("native", "nvfp4")  # native: as stored; nvfp4: matmul weights repacked at load (luce_core.formats.repack)
# The one documented default KV pair (README, tests and code all read it from here).
DEFAULT_KV = ("f16", "f16")


def _rotation_default() -> bool:
    """On unless LUCE_KV_ROTATION turns it off (so the API and the CLI honour the same switch)."""
    return os.environ.get("LUCE_KV_ROTATION", "1").strip().lower() not in ("0", "false", "off", "no")


def _weights_default() -> str:
    """LUCE_WEIGHTS, else native (so the API and the CLI honour the same switch)."""
    return os.environ.get("LUCE_WEIGHTS", "").strip().lower() or "native"


def _choice(options: tuple[str, ...]):
    def check(inst: Any, attribute: attrs.Attribute, value: str) -> None:
        if value not in options:
            raise ConfigError(f"{attribute.name}={value!r} is not one of {', '.join(options)}")
    return check


def _positive(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _auto_or_positive(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name} must be a positive integer (or 0: automatic), got {value!r}",
                          remedy=f"leave --{attribute.name.replace('_', '-')} out for the automatic value, "
                                 f"or pass a positive integer")


@attrs.frozen
class RunConfig:
    model_path: str = ""
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = attrs.field(default="auto", validator=_choice(COMPUTE_DTYPES))
    ctx: int = attrs.field(default=0, validator=_auto_or_positive)  # context length; 0 = min(trained, 4096)
    kv_k: str = attrs.field(default=DEFAULT_KV[0], validator=_choice(KV_DTYPES))
    kv_v: str = attrs.field(default=DEFAULT_KV[1], validator=_choice(KV_DTYPES))
    kv_rotation: bool = attrs.field(factory=_rotation_default)  # Hadamard-rotate quantized K (ignored for float K)
    feature_dtype: str = attrs.field(default="f32", validator=_choice(FEATURE_DTYPES))
    weights: str = attrs.field(factory=_weights_default, validator=_choice(WEIGHT_FORMATS))  # native | nvfp4
    cuda_graphs: bool = True
    # prompt tokens per prefill forward: larger chunks mean fewer kernel launches per prompt token
    # (small models' prefill is bound by launch overhead) at the cost of larger activations.
    # 0 = the attention implementation's preference (engine.Session resolves it)
    prefill_chunk: int = attrs.field(default=0, validator=_auto_or_positive)
    overrides: dict[str, str] = attrs.field(factory=dict)  # role -> forced implementation name
    model: "ModelConfig | None" = None  # filled in after loading; linear/attention check it
    weight_types: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)  # e.g. {"Q4_1","F32"}
    progress: bool = True

    def with_model(self, model: "ModelConfig", weight_types: set[str]) -> "RunConfig":
        return attrs.evolve(self, model=model, weight_types=frozenset(weight_types))

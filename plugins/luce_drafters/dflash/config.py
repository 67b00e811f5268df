"""The shape of a DFlash drafter, the target it was trained for, and its file version."""
from __future__ import annotations

import json
from typing import Any

import attrs

from luce_core.plugin_api import ConfigError, ModelConfig, ModelFileError

FORMAT = "luce-dflash"
CONFIG_VERSION = 1


def default_capture(n_layers: int, k: int = 5) -> tuple[int, ...]:
    """Up to ``k`` capture indices spread over the target: outputs of layers 1 .. n_layers-1
    (as lucebox takes layers {1, 16, 31, 46, 61} of 64), as forward capture indices (+1)."""
    if n_layers < 1:
        raise ConfigError(f"a target with {n_layers} layers has no hidden states to capture")
    if n_layers == 1:
        return (1,)
    k = min(k, n_layers - 1)
    outs = sorted({round(1 + i * (n_layers - 2) / max(k - 1, 1)) for i in range(k)})
    return tuple(o + 1 for o in outs)


def _positive(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"DFlash {attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class DFlashConfig:
    """Shape of a DFlash drafter and the target it was trained for."""

    target_hidden: int = attrs.field(validator=_positive)
    target_vocab: int = attrs.field(validator=_positive)
    target_layers: int = attrs.field(validator=_positive)
    capture: tuple[int, ...] = attrs.field(converter=lambda c: tuple(int(x) for x in c))
    width: int = attrs.field(default=256, validator=_positive)  # drafter hidden size
    n_layers: int = attrs.field(default=2, validator=_positive)
    n_heads: int = attrs.field(default=4, validator=_positive)
    n_kv_heads: int = attrs.field(default=2, validator=_positive)
    head_dim: int = attrs.field(default=64, validator=_positive)
    ffn: int = attrs.field(default=768, validator=_positive)
    block: int = attrs.field(default=8, validator=_positive)  # pending token + block-1 masks
    window: int = attrs.field(default=512, validator=_positive)  # context positions attended
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    target_name: str = ""
    version: int = CONFIG_VERSION

    def __attrs_post_init__(self) -> None:
        if self.block < 2:
            raise ConfigError(f"DFlash block size must be >= 2 (the pending token + at least one draft), "
                              f"got {self.block}",
                              remedy="use --block 2 or more (8 or 16 are typical)")
        if not self.capture:
            raise ConfigError("DFlash needs at least one captured target layer")
        bad = [c for c in self.capture if not 0 <= c <= self.target_layers]
        if bad:
            raise ConfigError(f"DFlash capture indices {bad} are outside 0..{self.target_layers} "
                              f"(the target has {self.target_layers} layers)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"DFlash n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"DFlash head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def feature_width(self) -> int:
        return len(self.capture) * self.target_hidden

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DFlashConfig":
        d = json.loads(text)
        if int(d.get("version", 0)) != CONFIG_VERSION:
            raise ModelFileError(f"DFlash drafter config version {d.get('version')} is not supported "
                                 f"(want {CONFIG_VERSION})",
                                 remedy="retrain the drafter with this luce (luce train-drafter)")
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_target(cfg: DFlashConfig, target_cfg: ModelConfig, where: str) -> None:
    """ConfigError unless the drafter was trained for a target of this shape."""
    pairs = [("hidden size", cfg.target_hidden, target_cfg.hidden), ("vocabulary", cfg.target_vocab, target_cfg.vocab),
             ("layer count", cfg.target_layers, target_cfg.n_layers)]
    for what, mine, theirs in pairs:
        if mine != theirs:
            raise ConfigError(f"the DFlash drafter {where} was trained for a target with {what} {mine}, "
                              f"but this target has {theirs}",
                              remedy="train a drafter for this model: "
                                     "luce train-drafter --target MODEL.gguf --out FILE")

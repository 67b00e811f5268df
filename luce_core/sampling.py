"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded."""
from __future__ import annotations

import math
import numbers
import reprlib
from typing import Any, Callable, Sequence

import attrs
import torch

from luce_core.contract.errors import ConfigError


def _limit(flag: str, want: str, ok: Callable[[Any], bool], remedy: str, *, integer: bool = False,
           optional: bool = False):
    """An attrs validator: a finite real (an integer with ``integer``; None with ``optional``) for
    which ``ok`` holds. NaN passes or fails comparisons by accident, so it is refused by name."""
    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and optional:
            return
        kind = numbers.Integral if integer else numbers.Real
        if (isinstance(value, bool) or not isinstance(value, kind)
                or not (integer or _finite(value)) or not ok(value)):
            raise ConfigError(f"{attribute.name} ({flag}) must be {want}, got {reprlib.repr(value)}", remedy=remedy)
    return check


def _finite(value: numbers.Real) -> bool:
    """A real that float32 arithmetic can take: finite, also as a float (10**400 is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


# Below this the logits / temperature overflow float32 (inf / inf = NaN in the softmax); the
# distribution is one-hot long before, so 0 (greedy) is the same choice.
MIN_TEMPERATURE = 1e-3


@attrs.frozen
class SamplingParams:
    temperature: float = attrs.field(default=0.0, validator=_limit(
        "--temp", f"0 or a finite number >= {MIN_TEMPERATURE}", lambda v: v == 0 or v >= MIN_TEMPERATURE,
        "0 decodes greedily; 0.7 is a usual sampling temperature"))
    top_k: int = attrs.field(default=0, validator=_limit(
        "--top-k", "an integer >= 0", lambda v: v >= 0, "0 turns top-k off", integer=True))
    top_p: float = attrs.field(default=1.0, validator=_limit(
        "--top-p", "a number in (0, 1]", lambda v: 0 < v <= 1, "1 turns top-p off"))
    min_p: float = attrs.field(default=0.0, validator=_limit(
        "--min-p", "a number in [0, 1)", lambda v: 0 <= v < 1, "0 turns min-p off"))
    repetition_penalty: float = attrs.field(default=1.0, validator=_limit(
        "--repeat-penalty", "a finite number > 0", lambda v: v > 0, "1 turns the penalty off"))
    # torch.Generator takes any 64-bit seed
    seed: int | None = attrs.field(default=None, validator=_limit(
        "--seed", f"an integer from 0 to {2**64 - 1} (2**64 - 1)", lambda v: 0 <= v < 2**64,
        "leave the seed out for a random one", integer=True, optional=True))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "SamplingParams":
        """From keyword options (``LLM.generate(**sampling)``): an unknown name is a ConfigError
        naming the known ones, not a TypeError."""
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {', '.join(unknown)}",
                              remedy=f"sampling options: {', '.join(sorted(known))}")
        return cls(**options)


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive / multiply negative logits of tokens already seen."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from, after temperature and truncation (float32)."""
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_k and p.top_k < probs.shape[-1]:
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= p.top_p * sorted_p.sum()
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs / probs.sum()


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """Pick the next token from logits [vocab] given the ids seen so far."""
        logits = apply_repetition_penalty(logits, history, self.params.repetition_penalty)
        if self.params.greedy:
            return int(torch.argmax(logits))
        probs = probabilities(logits, self.params).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))

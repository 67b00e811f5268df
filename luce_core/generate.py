"""The generation loop: one for plain and speculative decoding.

``generate(stepper, prompt, ...)`` checks the prompt, prefills it through the stepper (prefix
reuse), samples the first token from the prefill's logits, then takes tokens from the stepper
until a stop id, ``max_tokens`` or the context limit, and fills :class:`Stats`. A stepper says
how the tokens after the first are made: :class:`PlainStepper` one decode step per token,
``luce_core.speculative.stepper.SpeculativeStepper`` a draft/verify round that may yield several.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Iterator, Protocol, Sequence

import attrs
import torch

from luce_core.contract.errors import ConfigError
from luce_core.sampling import Sampler
from luce_core.session import Session, check_prompt_fits, sync


@attrs.define
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt prefix already in the KV store
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    finish_reason: str = ""  # stop | length | context

    @property
    def prefill_tps(self) -> float:
        done = self.prompt_tokens - self.reused_tokens
        return done / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from the prefill logits: decode steps = generated - 1
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        d = attrs.asdict(self)
        d.update(prefill_tps=round(self.prefill_tps, 2), decode_tps=round(self.decode_tps, 2))
        return d


class Stepper(Protocol):
    """How a session makes tokens: the loop asks it to prefill, then for tokens."""

    session: Session

    def prefill(self, ids: Sequence[int], progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
        """Make the session hold ``ids`` (reusing what it can); returns (logits after the last
        id, ids reused). ``progress(n)`` is told of each chunk of n ids run."""

    def decode(self, history: list[int], sampler: Sampler, end: int) -> Iterator[int]:
        """The tokens after ``history`` (the prompt and the tokens emitted so far; its last
        token is not in the session yet). The loop appends each token it takes to ``history``
        before asking for the next, and stops asking once ``len(history)`` reaches ``end``, so a
        stepper need not make tokens past that."""


class PlainStepper:
    """One token per step: the session's decode step, then the sampler."""

    def __init__(self, session: Session):
        self.session = session

    def prefill(self, ids: Sequence[int], progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
        return self.session.prefill(ids, progress)

    def decode(self, history: list[int], sampler: Sampler, end: int) -> Iterator[int]:
        step = self.session.step
        while True:
            yield sampler(step(history[-1]), history)


def generate(stepper: Stepper, prompt: Sequence[int], max_tokens: int, sampler: Sampler,
             stop_ids: frozenset[int] = frozenset(), stats: Stats | None = None,
             progress: Callable[[int], None] | None = None) -> Iterator[int]:
    """Yield up to ``max_tokens`` sampled ids. A stop id ends generation unyielded
    (finish_reason "stop"); so does a full context ("context"): a prompt of n ids leaves room
    for ctx - n generated ones, the last of which is sampled but never stored."""
    session = stepper.session
    stats = stats if stats is not None else Stats()
    if max_tokens < 0:
        raise ConfigError(f"max_tokens must be >= 0, got {max_tokens}")
    ids = [int(t) for t in prompt]
    check_prompt_fits(len(ids), session.ctx, session.model.cfg.ctx_train)
    device = session.model.device
    stats.prompt_tokens = len(ids)
    t0 = time.perf_counter()
    logits, stats.reused_tokens = stepper.prefill(ids, progress)
    sync(device)
    stats.prefill_s = time.perf_counter() - t0
    limit = min(max_tokens, session.ctx - len(ids))
    history = list(ids)
    t0 = time.perf_counter()
    stats.finish_reason = "length"
    try:
        if limit == 0:
            return
        first = sampler(logits, history)
        n = 0
        for tok in itertools.chain((first,), stepper.decode(history, sampler, len(ids) + limit)):
            if tok in stop_ids:
                stats.finish_reason = "stop"
                return
            history.append(tok)
            n += 1
            stats.generated_tokens = n
            yield tok
            if n == limit:
                break
        if limit < max_tokens:
            stats.finish_reason = "context"
    finally:
        sync(device)
        stats.decode_s = time.perf_counter() - t0

"""Acceptance and timing counters of speculative decoding."""
from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class SpecStats:
    """Acceptance and timing of speculative decoding (``as_dict()`` is JSON-ready)."""

    drafter: str = ""
    mode: str = "chain"
    budget: int = 0
    steps: int = 0  # target verify forwards
    drafted: int = 0  # draft tokens shown to the target (tree: real draft nodes)
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens produced by steps (accepted + bonus), before stop/length cuts; the
    # first token of a generation comes from the prefill's logits, not from a step
    offered_at: list[int] = attrs.field(factory=list)  # per draft depth: steps offering a draft there
    accepted_at: list[int] = attrs.field(factory=list)  # per draft depth: steps accepting one there
    moved_steps: int = 0  # tree steps whose accepted K/V had to move
    reforward_steps: int = 0  # ... of which by re-running the path (store not exactly copyable)
    rowwise_steps: int = 0  # verifies run one token at a time (the backend's multi-row forward is not exact)
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0  # acceptance + rollback / K/V relocation

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per verify: accepted drafts per step + the bonus token."""
        return self.accepted / self.steps + 1.0 if self.steps else 0.0

    @property
    def acceptance_rate_at(self) -> list[float]:
        return [a / o if o else 0.0 for a, o in zip(self.accepted_at, self.offered_at)]

    def record(self, offered_depth: int, drafted: int, accepted: int) -> None:
        while len(self.offered_at) < offered_depth:
            self.offered_at.append(0)
            self.accepted_at.append(0)
        for d in range(offered_depth):
            self.offered_at[d] += 1
        for d in range(accepted):
            self.accepted_at[d] += 1
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += accepted + 1

    def as_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        total = self.draft_s + self.verify_s + self.accept_s
        d.update(acceptance_length=round(self.acceptance_length, 4),
                 acceptance_rate_at=[round(r, 4) for r in self.acceptance_rate_at],
                 draft_fraction=round(self.draft_s / total, 4) if total else 0.0)
        for k in ("draft_s", "verify_s", "accept_s"):
            d[k] = round(d[k], 6)
        return d

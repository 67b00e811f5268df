"""Acceptance math: which drafts a verify keeps and which bonus token follows (pure functions).

Temperature 0 keeps the drafts that match the target's greedy choice; temperature > 0 is
speculative rejection sampling, so every emitted token is an exact draw from the distribution
the plain sampler would draw from.
"""
from __future__ import annotations

from typing import Sequence

import torch

from luce_core.sampling import SamplingParams, apply_repetition_penalty, probabilities
from luce_core.speculative.tree import DraftTree


def target_choice(logits: torch.Tensor, history: Sequence[int], params: SamplingParams) -> int:
    """The token greedy decoding of the target picks after ``history`` (temperature 0)."""
    return int(torch.argmax(apply_repetition_penalty(logits, history, params.repetition_penalty)))


def target_distribution(logits: torch.Tensor, history: Sequence[int], params: SamplingParams) -> torch.Tensor:
    """The exact distribution the plain sampler draws the next token from (float32, CPU)."""
    return probabilities(apply_repetition_penalty(logits, history, params.repetition_penalty), params).cpu()


def _draw(p: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(p, 1, generator=generator))


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to draw from after rejecting a draft from q."""
    r = torch.clamp(p - q, min=0.0)
    s = float(r.sum())
    return r / s if s > 0 else p  # s == 0 only when p == q, where no draft is ever rejected


def speculative_sample(p: torch.Tensor, q: torch.Tensor | None, draft: int,
                       generator: torch.Generator) -> tuple[bool, int]:
    """Rejection step for one draft ``draft`` ~ q (None: one-hot). Returns (accepted, token);
    the token is distributed exactly as p whatever q is."""
    pd = float(p[draft])
    qd = 1.0 if q is None else float(q[draft])
    if qd <= 0:
        raise ValueError(f"draft token {draft} has probability 0 under its own draft distribution")
    if _uniform(generator) < min(1.0, pd / qd):
        return True, draft
    if q is None:
        r = p.clone()
        r[draft] = 0.0
        s = float(r.sum())
        return False, _draw(r / s if s > 0 else p, generator)
    return False, _draw(residual(p, q.to(p.device, p.dtype)), generator)


def sample_among(p: torch.Tensor, candidates: Sequence[int], generator: torch.Generator) -> tuple[int, int]:
    """Try distinct one-hot candidates in order against p (multi-draft rejection sampling).

    Returns (index of the accepted candidate or -1, token). Each candidate c is accepted with
    probability r(c) under the residual r left by the rejected ones (r starts at p; a rejected
    candidate is zeroed and r renormalized); if all are rejected the token is drawn from r.
    The token is distributed exactly as p.
    """
    r = p.clone()
    for i, c in enumerate(candidates):
        s = float(r.sum())
        if s <= 0:
            break
        if _uniform(generator) < float(r[c]) / s:
            return i, int(c)
        r[c] = 0.0
    s = float(r.sum())
    return -1, _draw(r / s if s > 0 else p, generator)


def accept_chain(logits: torch.Tensor, drafts: Sequence[int], history: Sequence[int], params: SamplingParams,
                 generator: torch.Generator, draft_probs: torch.Tensor | None = None) -> tuple[int, int]:
    """(drafts accepted, bonus token) for a verified chain. ``logits`` row i follows
    ``history + drafts[:i]``; rows past len(drafts) are ignored (padding)."""
    m = len(drafts)
    if params.greedy:
        if params.repetition_penalty == 1.0:
            choice = torch.argmax(logits[: m + 1], dim=-1).tolist()  # one device sync per step
            a = 0
            while a < m and drafts[a] == choice[a]:
                a += 1
            return a, int(choice[a])
        hist = list(history)
        for a in range(m + 1):
            c = target_choice(logits[a], hist, params)
            if a == m or c != drafts[a]:
                return a, c
            hist.append(c)
    hist = list(history)
    for a in range(m):
        p = target_distribution(logits[a], hist, params)
        q = None if draft_probs is None else draft_probs[a].float().cpu()
        ok, tok = speculative_sample(p, q, int(drafts[a]), generator)
        if not ok:
            return a, tok
        hist.append(tok)
    return m, _draw(target_distribution(logits[m], hist, params), generator)


def accept_tree(logits: torch.Tensor, tree: DraftTree, history: Sequence[int], params: SamplingParams,
                generator: torch.Generator) -> tuple[list[int], int]:
    """(accepted node indices starting with the root, bonus token) for a verified tree."""
    kids = tree.ordered_children()
    path = [0]
    hist = list(history)
    if params.greedy and params.repetition_penalty == 1.0:
        choice = torch.argmax(logits[: tree.n_real], dim=-1).tolist()
    while True:
        node = path[-1]
        if params.greedy:
            c = choice[node] if params.repetition_penalty == 1.0 else target_choice(logits[node], hist, params)
            nxt = next((k for k in kids[node] if tree.tokens[k] == c), -1)
        else:
            p = target_distribution(logits[node], hist, params)
            idx, c = sample_among(p, [tree.tokens[k] for k in kids[node]], generator)
            nxt = kids[node][idx] if idx >= 0 else -1
        if nxt < 0:
            return path, int(c)
        path.append(nxt)
        hist.append(tree.tokens[nxt])

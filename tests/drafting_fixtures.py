"""Fixtures for testing drafters and the speculative engine: tiny synthetic targets, an untrained
DFlash drafter file, and a drafter that ranks the right token second.

Untied tiny llamas: with tied embeddings a random model mostly predicts the token it just saw,
which makes every drafter look perfect; an independent output matrix gives varied greedy text
with some repetition, so drafts are both accepted and rejected.
"""
from __future__ import annotations

import os
from typing import Any


def write_tiny(path: str | os.PathLike[str], *, seed: int = 0, hidden: int = 64, n_layers: int = 2,
               n_heads: int = 4, n_kv_heads: int = 2, vocab: int = 300, qtype: str = "F32", arch: str = "llama") -> str:
    from luce_tools.models.synth import write_synthetic_gguf

    write_synthetic_gguf(path, arch=arch, hidden=hidden, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, head_dim=hidden // n_heads, ffn=2 * hidden, vocab=vocab,
                         tied=False, qtype=qtype, seed=seed, return_weights=False)
    return str(path)


def load(path: str | os.PathLike[str], ctx: int = 128, **overrides: Any) -> Any:
    """A luce LLM on the CPU, no progress bars."""
    import luce

    return luce.load(str(path), device="cpu", ctx=ctx, progress=False, **overrides)


def random_dflash(target: Any, path: str | os.PathLike[str], *, block: int, seed: int = 0, window: int = 64,
                  capture: tuple[int, ...] | None = None) -> str:
    """An untrained (random) DFlash drafter for ``target`` (a Transformer), saved to ``path``."""
    from luce_drafters.dflash.files import save_drafter
    from luce_drafters.dflash.model import untrained

    save_drafter(path, *untrained(target.cfg, block=block, seed=seed, window=window, capture=capture))
    return str(path)


class SecondBest:
    """Test drafter: ranks a wrong token first and the target's true continuation second, so
    every accepted tree path leaves the depth-first chain and its K/V must move. ``continuation``
    is the target's own greedy output after a prompt of ``prompt_len`` tokens."""

    name = "second-best"
    capture: tuple[int, ...] = ()
    supports_tree = True

    def __init__(self, continuation: list[int], prompt_len: int, vocab: int, depth: int = 3):
        self.cont, self.plen, self.vocab, self.depth = continuation, prompt_len, vocab, depth

    def propose(self, tokens: Any, budget: int, *, request: Any = None) -> Any:
        import torch

        from luce_core.plugin_api import Proposal

        done = len(tokens) - self.plen
        want = self.cont[done:done + min(self.depth, request.max_depth)]
        lp = torch.full((len(want), self.vocab), -30.0)
        for i, t in enumerate(want):
            lp[i, (t + 1) % self.vocab] = -0.7
            lp[i, t] = -0.75
        return Proposal(logprobs=lp)

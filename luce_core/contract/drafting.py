"""The drafter role's contract: what a drafter binds to, is asked, and answers.

Speculative decoding (``luce_core.speculative``) drives a drafter through these types; a drafter
plugin needs nothing else from the core.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

import attrs

from luce_core.contract.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from luce_core.contract.types import Tokenizer
    from luce_core.feature_mirror import FeatureMirror
    from luce_core.model import Transformer
    from luce_core.sampling import SamplingParams
    from luce_core.speculative.tree import DraftTree


@attrs.frozen(eq=False)
class Target:
    """What a drafter may look at when it binds to a target model."""

    model: "Transformer"
    tokenizer: "Tokenizer"
    ctx: int
    plan: Any = None  # luce_core.plan.Plan when built by luce (caps/config for loading a draft model)


@attrs.frozen
class DrafterOptions:
    """User options for drafters (CLI: --draft-model, --draft-budget; tree knobs)."""

    draft_model: str | None = None  # draft-model: a GGUF; dflash: a drafter file (.safetensors / .gguf)
    ngram_max: int = 3  # prompt-lookup: longest suffix n-gram to match
    ngram_min: int = 1
    tree_topk: int = 8  # DDTree: candidates per depth
    tree_temp: float = 1.0  # DDTree: temperature of the draft log-probs that rank tree nodes

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"prompt-lookup n-gram range [{self.ngram_min}, {self.ngram_max}] is empty",
                              remedy="use 1 <= ngram_min <= ngram_max")
        if self.tree_topk < 1:
            raise ConfigError(f"tree_topk must be >= 1, got {self.tree_topk}")
        if self.tree_temp <= 0:
            raise ConfigError(f"tree_temp must be > 0, got {self.tree_temp}")


@attrs.frozen(eq=False)
class DraftRequest:
    """One call for drafts. ``tokens`` = committed + pending; the features mirror (if the
    drafter asked for captures) holds the target features of positions [0, len(tokens) - 1)."""

    tokens: Sequence[int]
    budget: int  # chain: at most this many drafts; tree: at most this many draft nodes
    tree: bool
    params: SamplingParams
    generator: torch.Generator
    max_depth: int  # drafts deeper than this cannot be emitted (a hint; deeper ones are harmless)
    features: "FeatureMirror | None" = None
    topk: int = 8
    tree_temp: float = 1.0


@attrs.frozen(eq=False)
class Proposal:
    """A drafter's answer. Any subset may be given:

    tokens: chain drafts d1..dk (the top-1 / sampled chain).
    probs: [k, vocab] distributions ``tokens`` were drawn from (None: deterministic, one-hot).
    logprobs: [L, vocab] per-depth draft log-probs; tree mode builds a DDTree from them.
    tree: a ready tree (root = the pending token), e.g. a trie of n-gram continuations.
    """

    tokens: tuple[int, ...] = ()
    probs: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    tree: DraftTree | None = None


class Drafter(Protocol):
    """The object a ``drafter`` factory builds."""

    name: str

    # optional (defaults in ``luce_core.contract.roles.OPTIONAL["drafter"]``)
    capture: tuple[int, ...]
    """Target layer indices whose input hidden states the drafter reads (``Transformer.forward``
    capture; index n_layers = the final pre-norm output). Default (): no feature mirror."""
    supports_tree: bool
    """Whether ``propose`` can serve tree requests (logprobs or a tree). Default False."""

    def bind(self, target: Target, options: DrafterOptions) -> None:
        """Check the drafter can serve this target (raise ConfigError naming why not) and load."""

    def propose(self, tokens: Sequence[int], budget: int, *, request: DraftRequest | None = None) -> Proposal: ...

    def truncate(self, n: int) -> None:
        """Optional: forget any state past the first ``n`` committed tokens (the engine rolled its
        cache back to a reused prefix). Default None: the drafter keeps no such state."""

    def spec_options(self, target: Target, workdir: str) -> "DrafterOptions":
        """Optional, for the conformance specs: options (e.g. test weights written under
        ``workdir``) with which this drafter can bind to ``target``. Default None: the default
        options do."""

"""The speculative stepper: each step is one draft -> verify -> accept -> relocate round
(the package docstring describes it); ``luce_core.generate`` drives it."""
from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from luce_core.contract.drafting import Drafter, DrafterOptions, DraftRequest, Proposal
from luce_core.contract.errors import ConfigError
from luce_core.contract.roles import optional
from luce_core.model import ForwardOut
from luce_core.sampling import Sampler
from luce_core.session import Session, common_prefix, sync
from luce_core.speculative.accept import accept_chain, accept_tree
from luce_core.speculative.relocate import exact_copy_store, relocate
from luce_core.speculative.stats import SpecStats
from luce_core.speculative.tree import DraftTree, build_ddtree, chain_tree, topk_logprobs

if TYPE_CHECKING:
    from luce_core.feature_mirror import FeatureMirror


def check_budget(budget: object) -> None:
    """ConfigError unless ``budget`` is a positive integer (checked before any drafter loads)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ConfigError(f"draft budget must be a positive integer, got {budget!r}",
                          remedy="use --draft-budget 1 or more")


def static_rows(n: int, budget: int) -> int:
    """Rows a static-shape chain verify of ``n`` tokens (pending + drafts) runs: 1 with no draft,
    else the next power of two, at most budget + 1. A few shapes keep the CUDA graphs few, and a
    step whose drafter found nothing costs a plain decode step, not a full-budget verify."""
    rows = 1
    while rows < n:
        rows *= 2
    return min(rows, budget + 1)


class SpeculativeStepper:
    """Speculative steps over a :class:`luce_core.session.Session` with one drafter.

    budget: chain - drafts per step; tree - draft nodes per step (DDTree budget).
    static_shapes: pad every verify (default: on for CUDA, off on CPU where padded rows cost
    real time).
    mirror: the feature mirror, required when the drafter reads target features (``capture``);
    ``wiring.stepper_for`` makes one through the plan's ``kv_storage``.
    """

    def __init__(self, session: Session, drafter: Drafter, *, budget: int, tree: bool = False,
                 static_shapes: bool | None = None, mirror: "FeatureMirror | None" = None,
                 options: DrafterOptions | None = None):
        check_budget(budget)
        if tree and not optional(drafter, "drafter", "supports_tree"):
            raise ConfigError(f"drafter {drafter.name!r} cannot propose trees",
                              remedy="drop --draft-tree, or use a drafter with tree support")
        self.session, self.drafter, self.budget, self.tree = session, drafter, budget, tree
        self.options = options or DrafterOptions()
        model = session.model
        self.static = model.device.type == "cuda" if static_shapes is None else static_shapes
        self.capture = tuple(int(c) for c in optional(drafter, "drafter", "capture"))
        for c in self.capture:
            if not 0 <= c <= model.cfg.n_layers:
                raise ConfigError(f"drafter {drafter.name!r} reads target layer {c}, but the target has "
                                  f"{model.cfg.n_layers} layers (capture indices 0..{model.cfg.n_layers})",
                                  remedy="use a drafter trained for this target")
        if self.capture and mirror is None:
            raise ConfigError(f"drafter {drafter.name!r} reads target features, but no feature mirror was given",
                              remedy="build the stepper with luce_core.speculative.wiring.stepper_for, which "
                                     "allocates the mirror through the plan's kv_storage")
        if tree and not model.exact_rows(1):
            raise ConfigError("draft trees need an attention implementation that declares exact tree rows "
                              "(Attention.exact_rows): without it the verify could round differently from "
                              "plain decoding", remedy="drop --draft-tree (chains stay exact), or use the torch "
                                                      "or cuda attention")
        self.mirror = mirror
        self._mirror_tokens: list[int] = []  # the tokens whose features the mirror holds
        self._exact_copy = exact_copy_store(session.kv)
        self.stats = self.reset_stats()

    def reset_stats(self) -> SpecStats:
        """Start a fresh SpecStats (e.g. per request); returns it."""
        self.stats = SpecStats(drafter=self.drafter.name, mode="tree" if self.tree else "chain", budget=self.budget)
        return self.stats

    # ------------------------------------------------------------------ the Stepper protocol
    def prefill(self, ids: Sequence[int], progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
        """Make the KV store (and the mirror) hold ``ids``; returns (logits after the last id,
        ids reused). At least the last id is run, so the first token comes from the same forward
        as plain decoding's."""
        s = self.session
        if self.mirror is None:
            return s.prefill(ids, progress)
        common = min(common_prefix(s.tokens, ids[:-1]), common_prefix(self._mirror_tokens, ids))
        s.truncate(common)
        del self._mirror_tokens[common:]
        self.mirror.set_length(common)
        truncate = optional(self.drafter, "drafter", "truncate")
        if truncate is not None:
            truncate(common)

        def on_chunk(start: int, chunk: list[int], out) -> None:
            self._commit_features(start, chunk, out.features)
            if progress:
                progress(len(chunk))

        logits = s.extend(ids, common, capture=self.capture, on_chunk=on_chunk)
        assert logits is not None
        return logits, common

    def decode(self, history: list[int], sampler: Sampler, end: int) -> Iterator[int]:
        while True:
            yield from self.step(history, sampler, max_depth=end - len(history) - 1)

    # ------------------------------------------------------------------ one round
    def _tensor(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long, device=self.session.model.device)

    def _commit_features(self, start: int, toks: Sequence[int], feats: torch.Tensor | None) -> None:
        assert self.mirror is not None and feats is not None and len(self._mirror_tokens) == start
        self.mirror.write(start, feats)
        self._mirror_tokens += list(toks)
        self.mirror.set_length(start + len(toks))

    def _request(self, history: list[int], budget: int, max_depth: int, sampler: Sampler) -> DraftRequest:
        return DraftRequest(tokens=history, budget=budget, tree=self.tree, params=sampler.params,
                            generator=sampler.generator, max_depth=max_depth, features=self.mirror,
                            topk=self.options.tree_topk, tree_temp=self.options.tree_temp)

    def step(self, history: list[int], sampler: Sampler, max_depth: int) -> list[int]:
        """One draft/verify/accept round after ``history`` (committed + pending). Commits the
        pending token and the accepted drafts to the KV store; returns them minus the pending
        token plus the bonus token (the new pending one)."""
        s = self.session
        n = len(s.tokens)
        assert n == len(history) - 1, "session and history disagree"
        room = s.ctx - n - 1  # KV slots left for drafts after the pending token's
        budget = min(self.budget, room)
        max_depth = max(0, min(max_depth, room))
        t0 = time.perf_counter()
        prop = self.drafter.propose(history, budget, request=self._request(history, budget, max_depth, sampler)) \
            if budget > 0 and max_depth > 0 else Proposal()
        t1 = time.perf_counter()
        self.stats.draft_s += t1 - t0
        if self.tree:
            return self._tree_step(history, prop, budget, max_depth, sampler, t1)
        return self._chain_step(history, prop, budget, sampler, t1)

    def _verify_chain(self, toks: list[int], n: int):
        """The forward over a chain verify's tokens at slots n..: one batch where every row rounds
        as decode (``Transformer.exact_rows``), else one decode step per token."""
        s = self.session
        if not s.model.exact_rows(len(toks)):
            self._rowwise()
        # static: the padded verify has static shapes, so it replays as one CUDA graph
        return s.forward_exact(toks, n, self.capture, static=self.static)

    def _rowwise(self) -> None:
        self.stats.rowwise_steps += 1
        if self.stats.rowwise_steps == 1:
            warnings.warn("luce: this backend does not declare its multi-row forwards exact (Linear/Attention."
                          "exact_rows), so speculative verification runs one token at a time: the output is "
                          "exactly plain decoding's, but it is not faster", stacklevel=4)

    def _chain_step(self, history: list[int], prop: Proposal, budget: int, sampler: Sampler, t1: float) -> list[int]:
        s = self.session
        n = len(s.tokens)
        drafts = [int(t) for t in prop.tokens[:budget]]
        probs = None if prop.probs is None else prop.probs[: len(drafts)]
        toks = [history[-1], *drafts]
        if self.static:  # padding rows follow the drafts: ignored
            toks += [history[-1]] * (static_rows(len(toks), budget) - len(toks))
        out = self._verify_chain(toks, n)
        logits, feats = out.logits, out.features
        s.kv.set_length(n + len(toks))
        sync(s.model.device)
        t2 = time.perf_counter()
        a, bonus = accept_chain(logits, drafts, history, sampler.params, sampler.generator, probs)
        kept = toks[: a + 1]
        s.tokens += kept
        s.kv.set_length(len(s.tokens))
        if self.mirror is not None:
            self._commit_features(n, kept, feats[: a + 1])
        t3 = time.perf_counter()
        self.stats.verify_s += t2 - t1
        self.stats.accept_s += t3 - t2
        self.stats.record(len(drafts), len(drafts), a)
        return [*drafts[:a], bonus]

    def _build_tree(self, root: int, prop: Proposal, budget: int, max_depth: int) -> DraftTree:
        if prop.tree is not None:
            if prop.tree.tokens[0] != root or prop.tree.n_real - 1 > budget:
                raise ValueError(f"drafter {self.drafter.name!r} returned a tree that does not fit the request")
            return prop.tree
        if prop.logprobs is not None and budget > 0 and max_depth > 0:
            lp = prop.logprobs[:max_depth]
            top_lp, top_ids = topk_logprobs(lp, self.options.tree_topk)
            return build_ddtree(root, top_lp, top_ids, budget)
        return chain_tree(root, list(prop.tokens[: min(budget, max_depth)]))

    def _tree_step(self, history: list[int], prop: Proposal, budget: int, max_depth: int,
                   sampler: Sampler, t1: float) -> list[int]:
        s = self.session
        n = len(s.tokens)
        tree = self._build_tree(history[-1], prop, budget, max_depth)
        if self.static:
            tree = tree.padded(budget + 1)
        dev = s.model.device
        t_build = time.perf_counter()
        self.stats.draft_s += t_build - t1
        graphs = s.graphs if self.static else None
        if not s.model.exact_rows(tree.size):  # node by node, each a one-row forward after its path
            self._rowwise()
            mask = tree.tree_mask(n, dev)
            out = ForwardOut.stack([s.model.forward(self._tensor(tree.tokens[j:j + 1]), n + j, s.kv,
                                                    positions=mask.positions[j:j + 1], mask=mask.row(j),
                                                    capture=self.capture) for j in range(tree.size)])
        elif graphs is not None:  # a padded tree has static shapes: replay it as one CUDA graph
            out = graphs.run_tree(tree, n, self.capture)
        else:
            mask = tree.tree_mask(n, dev)  # its positions (prefix + depth) are the RoPE positions too
            out = s.model.forward(self._tensor(tree.tokens), n, s.kv, positions=mask.positions, mask=mask,
                                  capture=self.capture)
        s.kv.set_length(n + tree.size)
        sync(dev)
        t2 = time.perf_counter()
        path, bonus = accept_tree(out.logits, tree, history, sampler.params, sampler.generator)
        kept = [tree.tokens[i] for i in path]
        how = relocate(s, path, kept, n, self._exact_copy)
        if how is not None:
            self.stats.moved_steps += 1
            if how == "forward":
                self.stats.reforward_steps += 1
        s.tokens += kept
        s.kv.set_length(len(s.tokens))
        if self.mirror is not None:
            self._commit_features(n, kept, out.features[torch.tensor(path, device=out.features.device)])
        t3 = time.perf_counter()
        self.stats.verify_s += t2 - t_build
        self.stats.accept_s += t3 - t2
        a = len(path) - 1
        self.stats.record(tree.max_depth if tree.n_real > 1 else 0, tree.n_real - 1, a)
        return [*kept[1:], bonus]

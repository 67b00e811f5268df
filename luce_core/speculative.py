"""Speculative decoding: draft -> verify -> accept -> bonus token -> rollback.

One decode step of :class:`SpeculativeDecoder`:

1. **Draft.** The drafter (a ``drafter`` role object, see ``luce_drafters``) proposes tokens after
   ``history`` = committed tokens + the *pending* token (sampled, not yet in the KV store).
2. **Verify.** One target forward over the pending token and the drafts at KV slots
   [n, n+T). A chain runs causally; a tree (DDTree) gets depth positions and an ancestor-only
   mask (``luce_core.tree``). With ``static_shapes`` the draft is padded to the budget so the
   verify forward always has the same shape (CUDA-graph capturable).
3. **Accept.** Temperature 0: the longest draft prefix (tree: path) that matches the target's
   choice (argmax after repetition penalty), then the target's own choice as the bonus token;
   the output is exactly what greedy decoding of the target alone produces. Temperature > 0:
   speculative rejection sampling against ``sampling.probabilities()`` (accept d with
   probability min(1, p(d)/q(d)); on rejection draw from norm(max(0, p - q))); deterministic
   drafts have a one-hot q. In a tree, the children of a node are tried in rank order, each
   as a one-hot proposal against the residual left by the rejected ones; that makes every
   emitted token an exact draw from the target distribution.
4. **Rollback.** The KV store (and the feature mirror) keep exactly the accepted path.
   Chain: ``set_length``, nothing moves. Tree: when the path is the depth-first-leftmost branch
   (the greedy chain is laid out first) the K/V are already in place. Otherwise the accepted
   nodes' K/V are moved down to consecutive slots: by the store's ``move`` (a byte copy of every
   layer's rows, exact for any format) when it has one, else by ``read``/``write`` when that
   round trip is exact (float storage whose values the compute dtype holds, unrotated K), else by
   re-running the accepted nodes from the first displaced one in a causal forward.
   The K/V of an accepted node is the same wherever it sits, because it depended only on the
   node's ancestors, which is the accepted path.

Generation starts by prefilling ``prompt[:-1]`` and treating the last prompt token as pending,
so the first generated token is already speculated. Nothing falls back to plain decoding: a
step with no drafts is a one-token verify and is counted as such in the stats.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import attrs
import torch

from luce_core.engine import check_prompt_fits, common_prefix
from luce_core.contract.errors import ConfigError
from luce_core.contract.drafting import Drafter, DrafterOptions, DraftRequest, Proposal, Target
from luce_core.sampling import Sampler, SamplingParams, apply_repetition_penalty, probabilities
from luce_core.tree import DraftTree, build_ddtree, chain_tree, topk_logprobs

if TYPE_CHECKING:
    from luce_core.engine import Session, Stats
    from luce_core.feature_mirror import FeatureMirror
    from luce_core.model import Transformer
    from luce_core.contract.types import Tokenizer


# ----------------------------------------------------------------------------- stats
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


# ----------------------------------------------------------------------------- acceptance math
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


# ----------------------------------------------------------------------------- KV relocation
def exact_copy_store(kv: Any) -> bool:
    """True when ``read`` -> ``write`` reproduces the stored K/V bit for bit: float storage whose
    every value the compute dtype holds, and K returned unrotated."""
    spec = kv.spec
    floats = ("f32", "f16", "bf16")
    for d in (spec.k_dtype, spec.v_dtype):
        if d not in floats or not (d == spec.compute_dtype or spec.compute_dtype == "f32"):
            return False
    probe = torch.randn(1, 1, spec.head_dim, generator=torch.Generator().manual_seed(0))
    try:
        rotated = kv.rotate_query(probe.to(spec.device))
    except Exception:  # a store that cannot say: do not trust the round trip
        return False
    return bool(torch.equal(rotated.float().cpu(), probe))


# ----------------------------------------------------------------------------- the decoder
class SpeculativeDecoder:
    """Speculative generation over a :class:`luce_core.engine.Session` with one drafter.

    budget: chain - drafts per step; tree - draft nodes per step (DDTree budget).
    static_shapes: pad every verify to the budget (default: on for CUDA, off on CPU where padded
    rows cost real time).
    mirror: the feature mirror for drafters that read target features (default: a f32 mirror on
    the target's device built with ``kv_storage`` or the torch store).
    """

    def __init__(self, session: "Session", drafter: Drafter, *, budget: int, tree: bool = False,
                 static_shapes: bool | None = None, mirror: "FeatureMirror | None" = None,
                 kv_storage: Any = None, feature_dtype: str = "f32", options: DrafterOptions | None = None):
        check_budget(budget)
        if tree and not getattr(drafter, "supports_tree", False):
            raise ConfigError(f"drafter {drafter.name!r} cannot propose trees",
                              remedy="drop --draft-tree, or use a drafter with tree support")
        self.session, self.drafter, self.budget, self.tree = session, drafter, budget, tree
        self.options = options or DrafterOptions()
        model = session.model
        self.static = model.device.type == "cuda" if static_shapes is None else static_shapes
        self.capture = tuple(int(c) for c in getattr(drafter, "capture", ()))
        for c in self.capture:
            if not 0 <= c <= model.cfg.n_layers:
                raise ConfigError(f"drafter {drafter.name!r} reads target layer {c}, but the target has "
                                  f"{model.cfg.n_layers} layers (capture indices 0..{model.cfg.n_layers})",
                                  remedy="use a drafter trained for this target")
        self.mirror = mirror
        if self.capture and mirror is None:
            from luce_core.feature_mirror import FeatureMirror
            if kv_storage is None:
                from luce_torch.kv import TorchKVStorage
                kv_storage = TorchKVStorage()
            self.mirror = FeatureMirror(kv_storage, session.ctx, len(self.capture) * model.cfg.hidden,
                                        feature_dtype, model.device)
        self._mirror_tokens: list[int] = []  # the tokens whose features the mirror holds
        self._exact_copy = exact_copy_store(session.kv)
        self.stats = self.reset_stats()

    def reset_stats(self) -> SpecStats:
        """Start a fresh SpecStats (e.g. per request); returns it."""
        self.stats = SpecStats(drafter=self.drafter.name, mode="tree" if self.tree else "chain", budget=self.budget)
        return self.stats

    # ------------------------------------------------------------------ prefill
    def _tensor(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long, device=self.session.model.device)

    def prefill(self, ids: Sequence[int]) -> tuple[torch.Tensor | None, int]:
        """Make the KV store (and mirror) hold ``ids``; returns (logits after the last id, or None
        when ``ids`` is empty, and how many ids were reused). At least the last id is run, as in
        ``Session.prefill``, so the first token comes from the same forward as plain decoding's."""
        s = self.session
        common = common_prefix(s.tokens, ids[:-1])
        if self.mirror is not None:
            common = min(common, common_prefix(self._mirror_tokens, ids))
        s.truncate(common)
        if self.mirror is not None:
            del self._mirror_tokens[common:]
            self.mirror.set_length(common)
            truncate = getattr(self.drafter, "truncate", None)
            if truncate is not None:
                truncate(common)
        logits = s.extend(ids, common, capture=self.capture,
                          on_chunk=lambda st, chunk, out: self._commit_features(st, chunk, out.features))
        return logits, common

    def _commit_features(self, start: int, toks: Sequence[int], feats: torch.Tensor | None) -> None:
        if self.mirror is None:
            return
        assert feats is not None and len(self._mirror_tokens) == start
        self.mirror.write(start, feats)
        self._mirror_tokens += list(toks)
        self.mirror.set_length(start + len(toks))

    # ------------------------------------------------------------------ one step
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
            out = self._tree_step(history, prop, budget, max_depth, sampler, t1)
        else:
            out = self._chain_step(history, prop, budget, sampler, t1)
        return out

    def _chain_step(self, history: list[int], prop: Proposal, budget: int, sampler: Sampler, t1: float) -> list[int]:
        s = self.session
        n = len(s.tokens)
        drafts = [int(t) for t in prop.tokens[:budget]]
        probs = None if prop.probs is None else prop.probs[: len(drafts)]
        toks = [history[-1], *drafts]
        if self.static:  # padding rows follow the drafts: ignored
            toks += [history[-1]] * (static_rows(len(toks), budget) - len(toks))
        graphs = getattr(s, "graphs", None) if self.static else None
        if graphs is not None:  # the padded verify has static shapes: replay it as one CUDA graph
            out = graphs.run(toks, n, self.capture)
            logits, feats = out.logits, out.features
        else:
            out = s.model.forward(self._tensor(toks), n, s.kv, capture=self.capture)
            logits, feats = out.logits, out.features
        s.kv.set_length(n + len(toks))
        _sync(s.model.device)
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
        graphs = getattr(s, "graphs", None) if self.static else None
        if graphs is not None:  # a padded tree has static shapes: replay it as one CUDA graph
            out = graphs.run_tree(tree, n, self.capture)
        else:
            mask = tree.tree_mask(n, dev)  # its positions (prefix + depth) are the RoPE positions too
            out = s.model.forward(self._tensor(tree.tokens), n, s.kv, positions=mask.positions, mask=mask,
                                  capture=self.capture)
        s.kv.set_length(n + tree.size)
        _sync(dev)
        t2 = time.perf_counter()
        path, bonus = accept_tree(out.logits, tree, history, sampler.params, sampler.generator)
        kept = [tree.tokens[i] for i in path]
        self._relocate(path, kept, n)
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

    def _relocate(self, path: list[int], kept: list[int], n: int) -> None:
        """Move the accepted nodes' K/V from slots n + path[i] to n + i."""
        j = next((i for i, node in enumerate(path) if node != i), None)
        if j is None:
            return
        s = self.session
        self.stats.moved_steps += 1
        src = torch.tensor([n + p for p in path[j:]], device=s.model.device)
        if callable(getattr(s.kv, "move", None)):
            s.kv.move(src, n + j)
        elif self._exact_copy:
            end = n + path[-1] + 1
            for layer in range(s.model.cfg.n_layers):
                k, v = s.kv.read(layer, end)
                s.kv.write(layer, n + j, k[src.to(k.device)], v[src.to(v.device)])
        else:
            self.stats.reforward_steps += 1
            s.model.forward(self._tensor(kept[j:]), n + j, s.kv, logits_rows=slice(-1, None))

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: Sequence[int], max_tokens: int, sampler: Sampler,
                 stop_ids: frozenset[int] = frozenset(), stats: "Stats | None" = None) -> Iterator[int]:
        """Yield up to ``max_tokens`` ids, like ``Session.generate`` (same stop / length / context
        rules and the same greedy output), drafting and verifying several tokens per forward."""
        from luce_core.engine import Stats

        s = self.session
        stats = stats if stats is not None else Stats()
        ids = [int(t) for t in prompt]
        check_prompt_fits(len(ids), s.ctx, s.model.cfg.ctx_train)
        if max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0, got {max_tokens}")
        stats.prompt_tokens = len(ids)
        t0 = time.perf_counter()
        # the whole prompt runs as plain decoding runs it; its logits give the first token
        logits, stats.reused_tokens = self.prefill(ids)
        _sync(s.model.device)
        stats.prefill_s = time.perf_counter() - t0
        # the plain engine emits at most ctx - len(prompt) tokens: match it exactly
        limit = min(max_tokens, s.ctx - len(ids))
        history = list(ids)
        emitted = 0
        t0 = time.perf_counter()
        stats.finish_reason = "length"
        try:
            if limit > 0:
                first = sampler(logits, history)
                if first in stop_ids:
                    stats.finish_reason = "stop"
                    return
                history.append(first)
                emitted = stats.generated_tokens = 1
                yield first
            while emitted < limit:
                for tok in self.step(history, sampler, max_depth=limit - emitted - 1):
                    if tok in stop_ids:
                        stats.finish_reason = "stop"
                        return
                    history.append(tok)
                    emitted += 1
                    stats.generated_tokens += 1
                    yield tok
                    if emitted == limit:
                        break
                stats.decode_s = time.perf_counter() - t0
            if limit < max_tokens:
                stats.finish_reason = "context"
        finally:
            _sync(s.model.device)
            stats.decode_s = time.perf_counter() - t0



def static_rows(n: int, budget: int) -> int:
    """Rows a static-shape chain verify of ``n`` tokens (pending + drafts) runs: 1 with no draft,
    else the next power of two, at most budget + 1. A few shapes keep the CUDA graphs few, and a
    step whose drafter found nothing costs a plain decode step, not a full-budget verify."""
    rows = 1
    while rows < n:
        rows *= 2
    return min(rows, budget + 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- wiring helpers
def check_budget(budget: object) -> None:
    """ConfigError unless ``budget`` is a positive integer (checked before any drafter loads)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ConfigError(f"draft budget must be a positive integer, got {budget!r}",
                          remedy="use --draft-budget 1 or more")


def make_drafter(name: str, plan: Any, options: DrafterOptions | None = None) -> Drafter:
    """Select the drafter ``name`` (forced, so an unknown or unrunnable one is an error with its
    reasons), build it and bind it to the plan's target model."""
    from luce_core import plugin_host, selection

    config = attrs.evolve(plan.config, overrides={**plan.config.overrides, "drafter": name})
    impl = selection.select("drafter", plugin_host.host().impls("drafter"), plan.caps, config)
    drafter = impl.create(plan.caps, config)
    drafter.bind(Target(plan.model, plan.loaded.tokenizer, plan.ctx, plan), options or DrafterOptions())
    return drafter


def decoder_for(plan: Any, session: "Session", drafter: str, *, budget: int, tree: bool = False,
                options: DrafterOptions | None = None) -> SpeculativeDecoder:
    """The decoder the API / CLI use: drafter by name, feature mirror through the plan's
    kv_storage in the configured feature dtype."""
    check_budget(budget)  # before a draft model's weights load
    options = options or DrafterOptions()
    d = make_drafter(drafter, plan, options)
    kv_storage = None
    if getattr(d, "capture", ()):
        impl = plan.chosen.get("kv_storage")
        kv_storage = impl.create(plan.caps, plan.config) if impl is not None else None
    return SpeculativeDecoder(session, d, budget=budget, tree=tree, kv_storage=kv_storage,
                              feature_dtype=plan.config.feature_dtype, options=options)

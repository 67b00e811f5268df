"""Draft model: a small GGUF of the target's family, run by luce itself, drafts autoregressively.

The draft model keeps its own KV store and reuses it across steps (its session re-prefills only
what changed since the last proposal: the accepted tokens and the new pending one). Chain mode
drafts greedily at temperature 0 and samples from the draft's own distribution (same sampling
parameters) at temperature > 0, returning those distributions for rejection sampling. A greedy
chain without a repetition penalty is decoded on the device (``Session.greedy``: with CUDA graphs
the whole chain is one replay, and the host waits once per proposal, not once per draft). Tree mode
returns the per-depth log-probs along the greedy draft chain; the engine builds a DDTree from
their top-K (alternatives at depth d are conditioned on the greedy chain above them - a heuristic
for which nodes to try; verification keeps the output exact whatever the tree).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from luce_core.formats.dtypes import DTYPE_NAMES

from luce_core.plugin_api import (ConfigError, DrafterOptions, DraftRequest, Proposal, Target, Tokenizer,
                                  target_choice, target_distribution)


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, target_name: str, draft_name: str,
                         target_vocab: int | None = None, draft_vocab: int | None = None) -> None:
    """ConfigError unless both tokenizers (and both models' logit widths) agree token for token."""
    remedy = "use a draft model of the same family as the target (same tokenizer), e.g. a smaller size"
    if target.vocab_size != draft.vocab_size:
        raise ConfigError(f"the draft model {draft_name} has a vocabulary of {draft.vocab_size} tokens but "
                          f"the target {target_name} has {target.vocab_size}", remedy=remedy)
    if target_vocab is not None and draft_vocab is not None and target_vocab != draft_vocab:
        raise ConfigError(f"the draft model {draft_name} outputs {draft_vocab} logits but the target "
                          f"{target_name} outputs {target_vocab}", remedy=remedy)
    ta, tb = getattr(target, "tokens", None), getattr(draft, "tokens", None)
    if ta is not None and tb is not None:
        diff = [i for i, (a, b) in enumerate(zip(ta, tb)) if a != b]
        if diff:
            i = diff[0]
            raise ConfigError(f"the draft model {draft_name} and the target {target_name} tokenize differently: "
                              f"{len(diff)} token ids differ, first id {i}: {tb[i]!r} (draft) vs {ta[i]!r} (target)",
                              remedy=remedy)
    else:  # tokenizers without a token list: compare what a spread of ids decodes to
        for i in range(0, target.vocab_size, max(1, target.vocab_size // 512)):
            a, b = target.decode([i]), draft.decode([i])
            if a != b:
                raise ConfigError(f"the draft model {draft_name} and the target {target_name} tokenize "
                                  f"differently: id {i} is {b!r} (draft) vs {a!r} (target)", remedy=remedy)
    for attr in ("bos_id",):
        if getattr(target, attr, None) != getattr(draft, attr, None):
            raise ConfigError(f"the draft model {draft_name} and the target {target_name} disagree on "
                              f"{attr}: {getattr(draft, attr)} vs {getattr(target, attr)}", remedy=remedy)


# Tokens per catch-up a draft session replays as a CUDA graph (one graph per count and window): the
# accepted drafts plus the pending token of a step, up to budget + 1.
GRAPH_EXTEND = 16


class DraftModelDrafter:
    name = "draft-model"
    capture: tuple[int, ...] = ()
    supports_tree = True

    def __init__(self, caps: Any = None, config: Any = None):
        self.caps, self.config = caps, config
        self.session: Any = None

    def bind(self, target: Target, options: DrafterOptions) -> None:
        import attrs

        from luce_core.plugin_api import probe
        from luce_core.plugin_api import RunConfig
        from luce_core.plugin_api import Session
        from luce_core.plugin_api import build

        if not options.draft_model:
            raise ConfigError("the draft-model drafter needs a draft model",
                              remedy="pass --draft-model FILE.gguf (a smaller model with the target's tokenizer)")
        model = target.model
        plan = target.plan
        device = str(model.device)
        dtype = DTYPE_NAMES[model.dtype]
        if plan is not None:
            base = attrs.evolve(plan.config, model_path=str(options.draft_model), model=None,
                                weight_types=frozenset(), ctx=target.ctx, progress=False)
            caps = plan.caps
        else:
            base = RunConfig(model_path=str(options.draft_model), ctx=target.ctx, progress=False)
            caps = self.caps if self.caps is not None else probe()
        config = attrs.evolve(base, device=device, dtype=dtype,
                              overrides={k: v for k, v in base.overrides.items() if k != "drafter"})
        dplan = build(config, caps)
        target_name = plan.config.model_path if plan is not None else "(target)"
        check_same_tokenizer(target.tokenizer, dplan.loaded.tokenizer, target_name, str(options.draft_model),
                             model.cfg.vocab, dplan.loaded.config.vocab)
        self.plan = dplan
        # the draft decodes one token at a time and catches up on the few accepted ones per step:
        # CUDA-graph both where luce's LLM would graph its decode steps
        graphs = (dplan.config.cuda_graphs and dplan.device.startswith("cuda") and hasattr(dplan.kv, "write_at"))
        self.session = Session(dplan.model, dplan.kv, dplan.ctx, graphs=graphs, graph_extend=GRAPH_EXTEND)

    def propose(self, tokens: Sequence[int], budget: int, *, request: DraftRequest | None = None) -> Proposal:
        if self.session is None:
            raise ConfigError("the draft-model drafter was used before bind()")
        from luce_core.plugin_api import SamplingParams

        k = budget if request is None else min(budget, request.max_depth)
        if k <= 0:
            return Proposal()
        params = request.params if request is not None else SamplingParams()
        tree = request is not None and request.tree
        sample = not params.greedy and not tree
        logits, _ = self.session.prefill(list(tokens))
        if not sample and params.repetition_penalty == 1.0:
            # the greedy chain is plain argmax: it runs on the device, one host sync per proposal
            drafts, rows = self.session.greedy(logits, k)
            lps = torch.log_softmax(rows / request.tree_temp, dim=-1) if tree else None
            return Proposal(tokens=tuple(drafts), logprobs=lps)
        hist = list(tokens)
        drafts: list[int] = []
        probs: list[torch.Tensor] = []
        lps: list[torch.Tensor] = []
        for i in range(k):
            if tree:
                lps.append(torch.log_softmax(logits.float() / request.tree_temp, dim=-1))
            if sample:
                q = target_distribution(logits, hist, params)
                t = int(torch.multinomial(q, 1, generator=request.generator))
                probs.append(q)
            else:
                t = target_choice(logits, hist, params)
            drafts.append(t)
            hist.append(t)
            if i + 1 < k:
                logits = self.session.step(t)
        return Proposal(tokens=tuple(drafts), probs=torch.stack(probs) if probs else None,
                        logprobs=torch.stack(lps) if lps else None)

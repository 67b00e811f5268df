"""Speculative decoding: draft -> verify -> accept -> relocate, as a stepper of the one
generation loop (``luce_core.generate``).

Generation prefills the whole prompt as plain decoding does and samples the first token from
the prefill's logits, as plain decoding does. That token is *pending*: sampled, not yet in the
KV store. Every later step of :class:`~luce_core.speculative.stepper.SpeculativeStepper` is one
round:

1. **Draft.** The drafter (a ``drafter`` role object, contract in ``luce_core.contract.drafting``)
   proposes tokens after ``history`` = committed tokens + the pending token.
2. **Verify.** The pending token and the drafts at KV slots [n, n+T), each row rounding exactly
   as the one-token decode step it replaces: one forward where the backend declares m-row
   forwards exact (``exact_rows``; a chain's rows as decode positions, a tree (DDTree) with
   depth positions and an ancestor-only mask, ``tree.py``), else one decode step per token
   (a tree: per node, after its path). With static shapes the one-forward verify is padded
   (chain: to a power of two rows, tree: to the budget) so it replays as a CUDA graph.
3. **Accept** (``accept.py``). Temperature 0: the longest draft prefix (tree: path) that matches
   the target's choice (argmax after repetition penalty), then the target's own choice as the
   bonus token; the output is exactly what greedy decoding of the target alone produces.
   Temperature > 0: speculative rejection sampling against ``sampling.probabilities()``
   (accept d with probability min(1, p(d)/q(d)); on rejection draw from norm(max(0, p - q)));
   deterministic drafts have a one-hot q. In a tree, the children of a node are tried in rank
   order, each as a one-hot proposal against the residual left by the rejected ones; that
   makes every emitted token an exact draw from the target distribution.
4. **Relocate** (``relocate.py``). The KV store (and the feature mirror) keep exactly the
   accepted path; the bonus token becomes the new pending one. Chain: ``set_length``, nothing
   moves. Tree: when the path is the depth-first-leftmost branch (the greedy chain is laid out
   first) the K/V are already in place. Otherwise the accepted nodes' K/V move down to
   consecutive slots: by the store's ``move`` (a byte copy, exact for any format) when it has
   one, else by ``read``/``write`` when that round trip is exact, else by re-running the
   accepted nodes from the first displaced one. The K/V of an accepted node is the same wherever
   it sits, because it depended only on its ancestors, which are the accepted path.

Nothing falls back to plain decoding: a step with no drafts is a one-token verify and is
counted as such in :class:`~luce_core.speculative.stats.SpecStats`. ``wiring.py`` builds a
drafter by name and a stepper with the feature mirror the plan's ``kv_storage`` provides.
"""

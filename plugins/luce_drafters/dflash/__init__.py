"""DFlash: a block drafter conditioned on the target's hidden states.

The drafter is a small transformer that fills in a whole block in one forward:

* **Target features.** The target captures the hidden states entering the layers listed in
  ``capture`` (``Transformer.forward`` capture indices: ``i`` = input of layer ``i`` = output of
  layer ``i-1``; ``n_layers`` = the final pre-norm hidden) at every committed position; they live
  in the feature mirror. The drafter projects their concatenation to its width:
  ``ctx = RMSNorm(fc(concat(features)))``.
* **Block.** Input is ``[pending token, MASK x (block-1)]`` at positions ``n .. n+block-1``: the
  pending token through the *target's* embedding, MASK a learned vector, then ``in_proj`` to
  the drafter width.
* **Layers.** Pre-norm attention + SwiGLU. Queries come from the block only; keys/values are
  ``concat(W_k ctx, W_k block)`` - the context rows do not change across layers, so their K/V
  per layer are computed once per committed position and cached. Attention is non-causal inside
  the block and sees the last ``window`` context positions. RoPE (rotate-half) at absolute
  positions. RMSNorm and RoPE are the core's (``luce_core.plugin_api``), one rounding order.
* **Head.** ``out_proj`` back to the target's hidden size, then the *target's* output norm and
  LM head. Rows 1..block-1 give the draft distributions of positions n+1 .. n+block-1: one
  forward drafts ``block - 1`` tokens.

Modules: ``config`` (DFlashConfig, its version, the target check), ``files`` (save/load),
``model`` (``DFlashModel``, the trainable formulation: many blocks per context, autograd),
``runtime`` (``FusedForward``, the same math with fused frozen weights and the target's layer
ops, and ``DFlashDrafter``, the drafter role with its K/V cache) and ``graph`` (one drafting step
with static shapes over explicit buffers, replayed as one CUDA graph). tests/test_dflash.py keeps
the three formulations equal.
"""

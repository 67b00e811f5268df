"""Hugging Face transformers as the external oracle for luce's model graph.

Two ways to build the oracle model:
- ``hf_from_gguf``: transformers' own GGUF conversion (gguf dequantization, llama Q/K
  un-permutation, tensor renaming) — the code ``from_pretrained(gguf_file=...)`` runs. It is called
  directly because ``from_pretrained`` additionally insists on ``accelerate``, which luce does not
  depend on; the weights and config are the same.
- ``hf_from_weights``: a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` built
  from explicit hyper-parameters and loaded with float32 weights in HF naming (as returned by
  ``luce_tools.models.synth.write_synthetic_gguf``).

Attention runs in HF's "eager" implementation: a code path independent of luce's SDPA call.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import attrs
import numpy as np
import torch

HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


@attrs.frozen
class Agreement:
    """How closely luce's logits [T, vocab] follow the oracle's."""

    max_abs: float  # max |luce - hf| over all positions and vocab entries
    rel: float  # max_abs / std of the oracle logits (scale-free)
    kl_mean: float  # mean over positions of KL(hf || luce), nats
    kl_max: float
    argmax_agree: float  # fraction of positions whose argmax matches

    def __str__(self) -> str:
        return (f"max_abs={self.max_abs:.3e} rel={self.rel:.3e} KL(hf||luce) mean={self.kl_mean:.3e} "
                f"max={self.kl_max:.3e} argmax_agree={self.argmax_agree:.3f}")


def compare(ref: torch.Tensor, got: torch.Tensor) -> Agreement:
    ref, got = ref.double(), got.double()
    assert ref.shape == got.shape, (ref.shape, got.shape)
    lp_ref, lp_got = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1)
    max_abs = float((ref - got).abs().max())
    return Agreement(max_abs=max_abs, rel=max_abs / float(ref.std()), kl_mean=float(kl.mean()),
                     kl_max=float(kl.max()),
                     argmax_agree=float((ref.argmax(-1) == got.argmax(-1)).double().mean()))


# ----------------------------------------------------------------------------- oracle models
def hf_from_gguf(path: str | os.PathLike[str]) -> Any:
    """The HF model transformers builds from a GGUF file (float32, eager attention)."""
    import transformers
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = os.fspath(path)
    cfg = transformers.AutoConfig.for_model(**load_gguf_checkpoint(path, return_tensors=False)["config"])
    cfg._attn_implementation = "eager"
    with no_init_weights():  # every weight comes from the file
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    assert set(result.missing_keys) <= allowed_missing and not result.unexpected_keys, result
    if cfg.tie_word_embeddings:
        model.tie_weights()
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model.eval()


def hf_from_weights(arch: str, weights: Mapping[str, np.ndarray], *, hidden: int, n_layers: int, n_heads: int,
                    n_kv_heads: int, head_dim: int, ffn: int, vocab: int, tied: bool, rope_base: float,
                    rms_eps: float, ctx: int) -> Any:
    """An HF model of ``arch`` with these hyper-parameters holding exactly ``weights``."""
    import transformers
    from transformers.initialization import no_init_weights

    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[arch])
    cfg = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n_layers,
                     num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
                     hidden_act="silu", max_position_embeddings=ctx, rms_norm_eps=rms_eps,
                     tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": rope_base})
    cfg._attn_implementation = "eager"
    with no_init_weights():
        model = model_cls(cfg).to(torch.float32)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)  # every parameter given, nothing extra
    if tied:
        model.tie_weights()
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model.eval()


@torch.inference_mode()
def hf_logits(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """Oracle logits [T, vocab] (float32) of every position of ``ids``."""
    out = model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


# ----------------------------------------------------------------------------- luce side
def luce_logits(llm: Any, ids: Sequence[int]) -> torch.Tensor:
    """luce's logits [T, vocab] for every position: one forward over a freshly emptied KV store."""
    llm.session.truncate(0)
    kv = llm.plan.kv
    out = llm.plan.model.forward(torch.tensor(list(ids), dtype=torch.long), 0, kv)
    llm.session.truncate(0)  # leave no half-tracked state behind
    return out.logits.float().cpu()


def luce_stepwise_logits(llm: Any, ids: Sequence[int], prefill: int = 1) -> torch.Tensor:
    """Logits of positions [prefill-1, T) via the engine: prefill ``ids[:prefill]``, then one
    ``Session.step`` per remaining token (each reads the K/V earlier steps appended)."""
    s = llm.session
    s.truncate(0)
    first, reused = s.prefill(list(ids[:prefill]))
    assert reused == 0
    rows = [first.float().cpu()]
    for tok in ids[prefill:]:
        rows.append(s.step(int(tok)).float().cpu())
    assert s.tokens == list(ids) and s.kv.length == len(ids)
    s.truncate(0)
    return torch.stack(rows)


# ---- a transformers model from a ModelConfig and HF-named weights (pairs with synth's output)
def hf_config(cfg: Any) -> Any:
    import transformers

    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config}
    if cfg.rope_scaling != "none":
        raise ValueError(f"hf_config does not translate rope scaling {cfg.rope_scaling!r}")
    config = classes[cfg.arch](
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.ctx_train, rms_norm_eps=cfg.rms_eps,
        tie_word_embeddings=cfg.tied_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
    )
    config.head_dim = cfg.head_dim  # Qwen2Config has no argument for it but its attention reads it
    return config


def hf_model(cfg: Any, weights: Mapping[str, np.ndarray], dtype: Any = None) -> Any:
    """A transformers CausalLM with exactly ``weights`` (strict: every parameter given, no extra)."""
    import torch
    import transformers

    dtype = dtype or torch.float32
    config = hf_config(cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


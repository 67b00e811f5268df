"""Build the Hugging Face transformers model a GGUF describes (the external oracle in tests).

Pairs with ``luce_gguf.synth.write_synthetic_gguf``, which returns its weights in HF naming:
``hf_model(loaded.config, weights)`` is then the same network as the file. transformers is a
test dependency, imported only here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    from luce_core.roles import ModelConfig


def hf_config(cfg: "ModelConfig") -> Any:
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


def hf_model(cfg: "ModelConfig", weights: Mapping[str, np.ndarray], dtype: Any = None) -> Any:
    """A transformers CausalLM with exactly ``weights`` (strict: every parameter given, no extra)."""
    import torch
    import transformers

    dtype = dtype or torch.float32
    config = hf_config(cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()

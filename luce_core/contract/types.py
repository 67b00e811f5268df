"""The data that crosses role boundaries: weights, model configs, tokenizers, KV specs.

Plain attrs classes and one tokenizer protocol; importing this module imports no torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import attrs

if TYPE_CHECKING:
    import numpy as np

# ----------------------------------------------------------------------------- loader
@attrs.frozen(eq=False)
class QTensor:
    """A weight in its stored format.

    qtype is the ggml type name ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K",
    "NVFP4"). shape is the logical row-major shape (``(out_features, in_features)`` for a matrix,
    i.e. GGUF's ne reversed). data holds the raw bytes, uint8 of shape ``(rows, bytes_per_row)``
    with rows = prod(shape[:-1]); for a loaded GGUF it is a view into the memory map, not a copy.
    scale is a per-tensor FP32 factor (NVFP4's second-level scale), 1.0 otherwise.
    """

    name: str
    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray
    scale: float = 1.0

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@attrs.frozen
class ModelConfig:
    """Architecture hyper-parameters of a llama-family model (llama, qwen2, qwen3)."""

    arch: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    ctx_train: int
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_dim: int = 0  # 0 = head_dim
    rope_style: str = "normal"  # "normal" (adjacent pairs, GGUF llama) or "neox" (halves, qwen)
    rope_scaling: str = "none"  # none | linear | llama3 (uses rope_freqs tensor) | yarn
    rope_factor: float = 1.0
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3
    tied_embeddings: bool = False
    name: str = ""


class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: frozenset[int]
    vocab_size: int
    add_bos: bool

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str: ...


@attrs.frozen(eq=False)
class LoadedModel:
    path: str
    config: ModelConfig
    tokenizer: Tokenizer
    tensors: Mapping[str, QTensor]
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    fingerprint: str = ""  # stable id of the weights (snapshots refuse other models)


# ----------------------------------------------------------------------------- kv storage
@attrs.frozen
class KVSpec:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    capacity: int  # positions
    k_dtype: str = "f16"
    v_dtype: str = "f16"
    rotation: bool = False  # Hadamard-rotate K (only meaningful for quantized K)
    device: str = "cpu"
    compute_dtype: str = "f32"  # dtype of tensors passed to write() and returned by read()
    fingerprint: str = ""  # model the cache belongs to; snapshots refuse to restore across models

"""The data that crosses role boundaries, and the protocol each role's object follows.

A role's factory (see ``luce_core.impl.Impl``) is called as ``factory(caps, config)`` and returns
an object following the protocol below. Torch is only needed for type checking here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import attrs
import numpy as np

if TYPE_CHECKING:
    import torch

    from luce_core.config import RunConfig


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


class Loader(Protocol):
    def load(self, path: str, config: "RunConfig") -> LoadedModel: ...


# ----------------------------------------------------------------------------- linear
class Linear(Protocol):
    def prepare(self, w: QTensor, device: "torch.device", dtype: "torch.dtype") -> Callable[["torch.Tensor"], "torch.Tensor"]:
        """Once per weight at load: returns ``f(x[..., in]) -> y[..., out] = x @ W.T``."""

    def dequantize(self, w: QTensor, device: "torch.device", dtype: "torch.dtype") -> "torch.Tensor":
        """The whole weight as a float tensor of ``w.shape`` (embeddings, norms)."""


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


class KVStore(Protocol):
    spec: KVSpec
    length: int  # positions [0, length) are valid

    def write(self, layer: int, start: int, k: "torch.Tensor", v: "torch.Tensor") -> None:
        """Store k, v ([T, n_kv_heads, head_dim]) at positions [start, start+T) of ``layer``."""

    def read(self, layer: int, end: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """K, V of positions [0, end) as [end, n_kv_heads, head_dim] in compute dtype, K in the
        store's basis (rotated when spec.rotation; pair it with rotate_query)."""

    def rotate_query(self, q: "torch.Tensor") -> "torch.Tensor":
        """q ([T, n_heads, head_dim]) in the basis read() returns K in (identity unrotated)."""

    def set_length(self, n: int) -> None:
        """Mark [0, n) valid: after a forward (growing) or to roll back (shrinking)."""

    # Optional: ``move(src: Tensor, dst: int)`` copies the stored rows of slots src to [dst, ...)
    # byte for byte in every layer; tree verification uses it to keep the accepted path (else it
    # round-trips read/write when that is exact, or re-runs the path).

    def snapshot(self) -> Any: ...
    def restore(self, snap: Any) -> None: ...

    @property
    def bytes_per_token(self) -> int: ...

    @property
    def nbytes(self) -> int: ...


class KVStorage(Protocol):
    def allocate(self, spec: KVSpec) -> KVStore: ...


# ----------------------------------------------------------------------------- attention
class Attention(Protocol):
    def forward(self, q: "torch.Tensor", kv: KVStore, layer: int, start: int, *,
                scale: float, mask: "torch.Tensor | None" = None,
                positions: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Queries q [T, n_heads, head_dim] at positions [start, start+T) attend over kv
        positions [0, start+T) of ``layer`` (GQA: n_heads is a multiple of n_kv_heads).
        Causal unless ``mask`` (bool [T, start+T], True = may attend) is given, e.g. a tree.
        ``positions`` (int64 device tensor [T], no mask) instead lets query t see slots
        [0, positions[t]]: the static-shape form a CUDA-graph replay uses, so an implementation
        must not read it on the host. Returns [T, n_heads, head_dim].

        An implementation may also offer ``layer_ops`` (see ``luce_core.layer_ops.LayerOps``):
        fused RMSNorm, RoPE and SwiGLU for the rest of the layer; the model uses the torch ones
        otherwise. And ``prefill_chunk`` (int): the prompt tokens per prefill forward it prefers
        when the user sets none (else ``luce_core.engine.DEFAULT_PREFILL_CHUNK``)."""


# ----------------------------------------------------------------------------- drafter
@runtime_checkable
class Drafter(Protocol):
    def propose(self, tokens: Sequence[int], budget: int) -> Any:
        """Draft continuation(s) of ``tokens`` for the target to verify (chain or tree)."""


# ----------------------------------------------------------------------------- chunk selector
class ChunkSelector(Protocol):
    def select(self, prompt_ids: Sequence[int], query_ids: Sequence[int], *,
               chunk_size: int, keep_ratio: float) -> list[int]:
        """Indices (ascending) of the ``chunk_size``-token chunks of ``prompt_ids`` to keep so
        that about ``keep_ratio`` of the prompt survives; ``query_ids`` is what is asked."""

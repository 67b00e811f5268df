"""The protocol each role's object follows, every optional member declared with its default.

A role's factory (see ``luce_core.contract.impl.Impl``) is called as ``factory(caps, config)``
and returns an object following the protocol below. Members marked *optional* may be left out;
the core then reads the default listed in ``OPTIONAL`` through :func:`optional`, never through an
ad-hoc ``getattr``, so what a plugin may leave out and what happens then is written down here
and nowhere else. Torch is only needed for type checking.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from luce_core.contract.kv_layout import KVTensors
from luce_core.contract.types import KVSpec, LoadedModel, QTensor

if TYPE_CHECKING:
    import torch

    from luce_core.config import RunConfig
    from luce_core.contract.layer_ops import LayerOps


# ----------------------------------------------------------------------------- loader
class Loader(Protocol):
    def load(self, path: str, config: "RunConfig") -> LoadedModel: ...


# ----------------------------------------------------------------------------- linear
class Linear(Protocol):
    def prepare(self, w: QTensor, device: "torch.device", dtype: "torch.dtype") -> Callable[["torch.Tensor"], "torch.Tensor"]:
        """Once per weight at load: returns ``f(x[..., in]) -> y[..., out] = x @ W.T``."""

    def dequantize(self, w: QTensor, device: "torch.device", dtype: "torch.dtype") -> "torch.Tensor":
        """The whole weight as a float tensor of ``w.shape`` (embeddings, norms)."""

    # optional
    def exact_rows(self, m: int) -> bool:
        """True when a matmul of ``m`` rows gives every row bit for bit what a one-row matmul of
        that row gives, for every weight prepared so far: then a speculative verify of m rows
        rounds exactly as the m decode steps it replaces. Default None: no such promise, and
        speculative decoding verifies row by row (exact, slower)."""

    layer_ops: "LayerOps | None"
    """The rest of a layer around this role's matmuls (RMSNorm prologue, SwiGLU / residual
    epilogues, RoPE + KV store after the QKV projection), fused where the implementation can.
    Default None: the model uses the torch reference ``luce_core.layer_ops.TORCH_LAYER_OPS``.
    The fusions belong to the linear role because they live inside its matmuls."""


# ----------------------------------------------------------------------------- kv storage
class KVStore(Protocol):
    spec: KVSpec  # spec.fingerprint names the model the cache belongs to (snapshots check it)
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

    def snapshot(self) -> Any: ...
    def restore(self, snap: Any) -> None: ...

    @property
    def bytes_per_token(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    # optional
    def write_at(self, layer: int, slots: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor") -> None:
        """Store k, v [T, ...] at the slots of an int64 device tensor [T], without reading it on
        the host: the static-shape write a CUDA-graph replay needs. Default None: decode runs
        eagerly (no CUDA graphs), and ``luce doctor`` says so."""

    def move(self, src: "torch.Tensor", dst: int) -> None:
        """Copy the stored rows of slots ``src`` (int64 tensor) to [dst, dst + len(src)) byte for
        byte in every layer (tree verification keeps an accepted off-chain path this way).
        Default None: read/write round trip where that is exact, else the path is re-run."""

    def read_range(self, layer: int, start: int, end: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """K, V of positions [start, end), as ``read``. Default None: ``read(layer, end)[start:]``."""

    tensors: KVTensors | None
    """The store's memory in the layout its descriptor names (``Impl.kv_layout``, e.g.
    ``dense-v1``; see ``luce_core.contract.kv_layout``), for attention implementations that read
    it directly. Must be present when the descriptor names a layout. Default None: an opaque
    store, reached only through the members above (selection pairs it with an attention
    implementation that reads any store)."""

    def write_rotary(self, layer: int, slots: "int | torch.Tensor", q: "torch.Tensor", k: "torch.Tensor",
                     v: "torch.Tensor", cos: "torch.Tensor", sin: "torch.Tensor", positions: "torch.Tensor",
                     style: str) -> bool:
        """RoPE and the store in one step: rotate q [T, Hq, D] in place and k [T, H, D] with the
        f32 tables cos/sin [max_pos, rope_dim/2] at ``positions`` (int64 [T]), then store k and v
        at ``slots`` (a start int as ``write``, or a device tensor as ``write_at``). Returns False,
        having done nothing, where it cannot serve the call. Default None: the layer ops rotate,
        then write."""

    def rope_store_args(self, layer: int, slots: "int | torch.Tensor", positions: "torch.Tensor",
                        cos: "torch.Tensor", sin: "torch.Tensor", style: str, nq: int,
                        dtype: "torch.dtype") -> Any:
        """Backend-private: what a QKV matmul of the *same backend* needs to rotate and store this
        layer's k and v in its epilogue, or None where it cannot. The core never reads the value;
        only that backend's ``LayerOps`` interprets it (the one named escape hatch between a
        backend's linear and KV roles). Default None: no such fusion."""


class KVStorage(Protocol):
    def allocate(self, spec: KVSpec) -> KVStore: ...


# ----------------------------------------------------------------------------- attention
class Attention(Protocol):
    def forward(self, q: "torch.Tensor", kv: KVStore, layer: int, start: int, *,
                scale: float, mask: "torch.Tensor | None" = None,
                positions: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Queries q [T, n_heads, head_dim] at positions [start, start+T) attend over kv
        positions [0, start+T) of ``layer`` (GQA: n_heads is a multiple of n_kv_heads).
        Causal unless ``mask`` (bool [T, start+T], True = may attend, or a
        ``luce_core.speculative.tree.TreeMask``) is given, e.g. a tree. ``positions`` (int64 device tensor
        [T], no mask) instead lets query t see slots [0, positions[t]]: the static-shape form a
        CUDA-graph replay uses, so an implementation must not read it on the host.
        Returns [T, n_heads, head_dim]."""

    # optional
    def exact_rows(self, m: int) -> bool:
        """True when a forward of ``m`` rows given ``positions`` or a ``TreeMask`` gives every row
        bit for bit what a one-row decode step at that row's position, after that row's path,
        gives. For m == 1 with a TreeMask this is what row-by-row tree verification relies on.
        Default None: no such promise; speculative decoding then verifies chains as one-token
        decode steps and refuses draft trees."""

    prefill_chunk: int
    """Prompt tokens per prefill forward this implementation prefers when the user sets none.
    Default 0: the engine's ``DEFAULT_PREFILL_CHUNK``."""


# ----------------------------------------------------------------------------- chunk selector
class ChunkSelector(Protocol):
    def select(self, prompt_ids: Sequence[int], query_ids: Sequence[int], *,
               chunk_size: int, keep_ratio: float) -> list[int]:
        """Indices (ascending) of the ``chunk_size``-token chunks of ``prompt_ids`` to keep so
        that about ``keep_ratio`` of the prompt survives; ``query_ids`` is what is asked."""


# ----------------------------------------------------------------------------- optional members
OPTIONAL: dict[str, dict[str, Any]] = {
    "linear": {"layer_ops": None, "exact_rows": None},
    "kv_store": {"write_at": None, "move": None, "read_range": None, "tensors": None, "write_rotary": None,
                 "rope_store_args": None},
    "attention": {"prefill_chunk": 0, "exact_rows": None},
    "drafter": {"capture": (), "supports_tree": False, "truncate": None, "spec_options": None},
}
"""Per role object, every optional member and the default the core uses when it is absent."""


def optional(obj: Any, role: str, member: str) -> Any:
    """``obj``'s optional ``member`` of ``role``, or the declared default. Asking for a member
    the contract does not declare is a programming error (KeyError), so no undeclared member
    can creep into the core's reads."""
    default = OPTIONAL[role][member]
    return getattr(obj, member, default)

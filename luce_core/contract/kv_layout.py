"""The in-memory KV layouts a store can promise and an attention implementation can read.

A ``kv_storage`` descriptor names the layout its stores provide (``Impl.kv_layout``); an
``attention`` descriptor names the layouts it reads (``Impl.reads_kv_layouts``). Selection pairs
them (``luce_core.selection``), so an attention implementation never meets a store it cannot read.
A store whose descriptor names no layout is *opaque*: only the generic ``KVStore`` protocol
(``write``/``read``/...) reaches its data, which every attention implementation that declares
``reads_kv_layouts=None`` uses.

``dense-v1`` (``DENSE_V1``), what luce's torch and CUDA stores hold and the CUDA attention reads:

* K and V are separate tensors ``[n_layers, capacity, n_kv_heads, row]`` on the store's device,
  contiguous; slot ``p`` of layer ``l`` holds position ``p``.
* A row is ``head_dim`` elements of f32 / f16 / bf16 (the tensor's dtype), or, for q8_0 / q4_0,
  uint8 ggml blocks of 32 elements (``luce_core.formats.blocks``, quantized with ggml's
  rounding). ``KVTensors.k_format`` / ``v_format`` name the format; K and V are independent.
* A rotated K (``KVTensors.rotation_group > 0``) stores ``luce_core.formats.hadamard``'s
  ``rotate(k)`` with these ``signs`` (f32 ``[head_dim]``, on the store's device) over aligned groups
  of ``rotation_group`` channels (a power of two dividing head_dim); ``read`` returns K in that
  basis and ``rotate_query`` moves queries into it.

The store hands the layout out through its optional member ``KVStore.tensors`` (see
``luce_core.contract.roles``): a :class:`KVTensors` whose tensors are the store's own memory
(writes through the store show in them; ``read`` returns what they hold, decoded).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import torch

DENSE_V1 = "dense-v1"
OPAQUE = ""  # a store descriptor naming no layout
FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0")


def layout_name(layout: str) -> str:
    """How reasons and ``luce doctor`` name a layout."""
    return layout or "opaque"


@attrs.frozen(eq=False)
class KVTensors:
    """A dense-v1 store's memory, as attention kernels read it (see the module docstring)."""

    k: "torch.Tensor"  # [n_layers, capacity, n_kv_heads, row]
    v: "torch.Tensor"
    k_format: str = attrs.field(validator=attrs.validators.in_(FORMATS))
    v_format: str = attrs.field(validator=attrs.validators.in_(FORMATS))
    rotation_group: int = 0  # 0: K is stored unrotated
    signs: "torch.Tensor | None" = None  # the Hadamard signs when rotation_group > 0
    layout: str = DENSE_V1

    @property
    def rotated(self) -> bool:
        return self.rotation_group > 0

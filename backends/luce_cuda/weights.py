"""Quantized weights on the GPU: the ggml blocks of each row split into planes.

A weight [N, K] keeps its exact block bytes, re-laid once at upload so that the packed quants of
a row are contiguous and 16-byte aligned (plane 0) and the block scales sit in their own planes;
see kernels/quant.cuh for what each plane holds. Nothing is dequantized.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import numpy as np

from luce_core.plugin_api import UnsupportedModelError
from luce_core.formats.blocks import BLOCKS

if TYPE_CHECKING:
    import torch

    from luce_core.plugin_api import QTensor

# qtype -> [(first byte, last byte) of each plane inside one block]; plane order p0, p1, p2, p3.
PLANE_SLICES: dict[str, tuple[tuple[int, int] | None, ...]] = {
    "Q4_0": ((2, 18), None, (0, 2), None),
    "Q4_1": ((4, 20), None, (0, 4), None),
    "Q8_0": ((2, 34), None, (0, 2), None),
    "Q4_K": ((16, 144), None, (0, 16), None),
    "Q6_K": ((0, 128), (128, 192), (192, 208), (208, 210)),
    "NVFP4": ((4, 36), None, (0, 4), None),
}
QUANTIZED = tuple(PLANE_SLICES)


def split_planes(qtype: str, data: np.ndarray, n: int, k: int) -> list[np.ndarray | None]:
    """Host-side re-layout: ``data`` uint8 [n, row_bytes] -> contiguous uint8 planes [n, *]."""
    if qtype not in PLANE_SLICES:
        raise UnsupportedModelError(f"luce_cuda has no kernel for tensor type {qtype}",
                                    remedy=f"kernels exist for {', '.join(QUANTIZED)}; force LUCE_LINEAR=torch")
    elems, nbytes = BLOCKS[qtype]
    if k % elems or k % 32:
        raise UnsupportedModelError(f"{qtype} rows of {k} elements are not whole blocks")
    nb = k // elems
    blocks = np.ascontiguousarray(data).reshape(n, nb, nbytes)
    return [None if sl is None else np.ascontiguousarray(blocks[:, :, sl[0]:sl[1]]).reshape(n, -1)
            for sl in PLANE_SLICES[qtype]]


@attrs.frozen(eq=False)
class DeviceWeight:
    """One quantized matrix on the GPU. ``alpha`` is the per-tensor scale (NVFP4), else 1."""

    qtype: str
    n: int
    k: int
    planes: tuple["torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]
    alpha: float = 1.0

    @property
    def nbytes(self) -> int:
        return sum(int(p.numel()) for p in self.planes if p is not None)


def upload(w: "QTensor", device: "torch.device") -> DeviceWeight:
    import torch

    if len(w.shape) != 2:
        raise UnsupportedModelError(f"{w.name}: a linear weight must be 2-D, got shape {w.shape}")
    n, k = int(w.shape[0]), int(w.shape[1])
    planes = split_planes(w.qtype, np.asarray(w.data), n, k)
    dev = tuple(None if p is None else torch.from_numpy(p).to(device) for p in planes)
    return DeviceWeight(w.qtype, n, k, dev, float(w.scale))  # type: ignore[arg-type]

"""The element-wise rest of a transformer layer and the fusions around its matmuls, as one protocol.

The linear role offers an implementation (``Linear.layer_ops``, optional): the fusions live
inside its matmuls (RMSNorm prologue, SwiGLU and residual epilogues, RoPE + KV store after the
QKV projection). ``luce_core.layer_ops.TorchLayerOps`` is the reference and the default.
Implementations may work in place (``linear_residual`` updating ``residual``, ``rope_qk``
rotating q and k): callers must use the returned tensors and must not rely on the inputs being
left untouched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from luce_core.contract.roles import KVStore
    from luce_core.model import Block


class LayerOps(Protocol):
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) * w over the last dim (f32 math, x's dtype out)."""

    def rope_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                pos: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D] and k [T, Hk, D] rotated for positions pos [T] (int64) with the f32
        tables cos/sin [max_positions, rope_dim/2]."""

    def rope_store(self, kv: "KVStore", layer: int, slots: int | torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   style: str) -> torch.Tensor:
        """rope_qk, then k and v stored in ``kv`` at ``slots`` (``kv.write`` from a start int,
        ``kv.write_at`` from a device tensor); returns the rotated q. A backend may do both in
        one kernel."""

    def qkv_rope_store(self, block: "Block", x: torch.Tensor, eps: float, kv: "KVStore", layer: int,
                       slots: int | torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                       style: str, head_dim: int) -> torch.Tensor:
        """A layer's attention input: q, k, v projected from the residual stream x [T, hidden]
        (``norm_linear`` with the block's attn_norm, then its biases and q/k norms), then
        ``rope_store``; returns the rotated q [T, Hq, head_dim]. A backend may do all of it in the
        QKV matmul."""

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up."""

    def linear(self, proj: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
               glu: bool = False) -> torch.Tensor:
        """proj(x); with ``glu`` proj's output is [gate | up] and silu(gate) * up is returned."""

    def norm_linear(self, proj: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, w: torch.Tensor,
                    eps: float, *, glu: bool = False, out_f32: bool = False) -> torch.Tensor:
        """linear(proj, rms_norm(x, w, eps), glu=glu); with ``out_f32`` that result ``.float()``
        (the logits), which a backend may write in f32 directly."""

    def linear_residual(self, proj: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        residual: torch.Tensor) -> torch.Tensor:
        """residual + proj(x) rounded to residual's dtype (may update residual in place)."""

"""The element-wise rest of a transformer layer: RMSNorm, RoPE on Q and K together
(``rope_store``: and the KV append after it, which a backend can do in the same kernel),
SwiGLU, and the projections with what a backend can fuse into the matmul:
``linear`` (the SwiGLU of a [gate | up] output, in the epilogue), ``norm_linear`` (the RMSNorm of
its input, in the prologue) and ``linear_residual`` (the residual add, in the epilogue).

``TorchLayerOps`` is the reference the model uses by default. A backend whose attention
implementation offers ``layer_ops`` (luce_cuda: one fused kernel per op) replaces it, which is
what makes a decode step a few dozen kernels instead of hundreds. Implementations may work in
place (``linear_residual`` updating ``residual``, ``rope_qk`` rotating q and k): callers must use
the returned tensors and must not rely on the inputs being left untouched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch

from luce_core import rope

if TYPE_CHECKING:
    from luce_core.model import Block
    from luce_core.roles import KVStore


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


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


class TorchLayerOps:
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, w, eps)

    def rope_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                pos: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = cos[pos], sin[pos]
        return rope.apply_rope(q, c, s, style), rope.apply_rope(k, c, s, style)

    def rope_store(self, kv: "KVStore", layer: int, slots: int | torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   style: str) -> torch.Tensor:
        q, k = self.rope_qk(q, k, cos, sin, pos, style)
        if isinstance(slots, torch.Tensor):
            kv.write_at(layer, slots, k, v)
        else:
            kv.write(layer, slots, k, v)
        return q

    def qkv_rope_store(self, block: "Block", x: torch.Tensor, eps: float, kv: "KVStore", layer: int,
                       slots: int | torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                       style: str, head_dim: int) -> torch.Tensor:
        b, T = block, x.shape[0]
        q, k, v = b.split_qkv(self.norm_linear(b.qkv, x, b.attn_norm, eps))
        if b.q_bias is not None:
            q, k, v = q + b.q_bias.to(q.dtype), k + b.k_bias.to(k.dtype), v + b.v_bias.to(v.dtype)
        q, k, v = (t.view(T, t.shape[-1] // head_dim, head_dim) for t in (q, k, v))
        if b.q_norm is not None:
            q, k = self.rms_norm(q, b.q_norm, eps), self.rms_norm(k, b.k_norm, eps)
        return self.rope_store(kv, layer, slots, q, k, v, cos, sin, pos, style)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(gate) * up

    def linear(self, proj: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
               glu: bool = False) -> torch.Tensor:
        # the unfused sequence, with this object's ops (a subclass's kernels run it too)
        y = proj(x)
        if not glu:
            return y
        f = y.shape[-1] // 2
        return self.swiglu(y[..., :f], y[..., f:])

    def norm_linear(self, proj: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, w: torch.Tensor,
                    eps: float, *, glu: bool = False, out_f32: bool = False) -> torch.Tensor:
        y = self.linear(proj, self.rms_norm(x, w, eps), glu=glu)
        return y.float() if out_f32 else y

    def linear_residual(self, proj: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        residual: torch.Tensor) -> torch.Tensor:
        return residual + proj(x).to(residual.dtype)


TORCH_LAYER_OPS = TorchLayerOps()

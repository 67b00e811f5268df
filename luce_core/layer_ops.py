"""The element-wise rest of a transformer layer: RMSNorm, RoPE on Q and K together
(``rope_store``: and the KV append after it, which a backend can do in the same kernel),
SwiGLU, and the projections with what a backend can fuse into the matmul:
``linear`` (the SwiGLU of a [gate | up] output, in the epilogue), ``norm_linear`` (the RMSNorm of
its input, in the prologue) and ``linear_residual`` (the residual add, in the epilogue).

``TorchLayerOps`` is the reference implementation of ``luce_core.contract.layer_ops.LayerOps``
and the model's default. A linear implementation that offers ``layer_ops`` (luce_cuda: one
fused kernel per op) replaces it, which is what makes a decode step a few dozen kernels instead
of hundreds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from luce_core import rope

if TYPE_CHECKING:
    from luce_core.model import Block
    from luce_core.contract.roles import KVStore


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

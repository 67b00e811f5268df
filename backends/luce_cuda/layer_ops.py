"""luce_core.layer_ops on CUDA: one fused kernel per op (kernels/ops.cu), in place where the
protocol allows, no host sync, so a decode step built from them is capturable in a CUDA graph.
On a luce_cuda weight the GEMV (kernels/gemv.cu) takes in what surrounds it: SwiGLU in the
gate|up epilogue (``linear(..., glu=True)``), the RMSNorm of its input in its prologue
(``norm_linear``), the residual add in its epilogue (``linear_residual``); ``rope_store`` does RoPE
inside the KV append, and ``qkv_rope_store`` does RoPE and the append inside the QKV GEMV's
epilogue where the cache is f32/f16/bf16 (``LUCE_FUSE_ROPE_STORE=0``: the append kernel does
it). A decoded layer is then five launches: QKV (normalizing, RoPE, K/V stored), attention,
O (+ residual), gate|up (normalizing, SwiGLU), down (+ residual); the LM head writes f32 logits
itself. Each fusion gives bit for bit the unfused kernels' result.

The CUDA linear role offers it (``CudaLinear.layer_ops``). It reaches the KV store only through
the store's declared optional members ``write_rotary`` and ``rope_store_args``
(``luce_core.contract.roles.KVStore``; luce_cuda's store has both), so any store works with it:
one without them is written by ``write`` / ``write_at`` after the RoPE kernel."""
from __future__ import annotations

import os
from typing import Callable

import torch

from luce_core.plugin_api import TorchLayerOps, optional
from luce_cuda import ops
from luce_cuda.linear import QuantLinear


class CudaLayerOps(TorchLayerOps):
    def _f32(self, w: torch.Tensor) -> torch.Tensor:
        # the kernels read f32 weights; the model keeps its norm weights in f32 already
        return w if w.dtype == torch.float32 and w.is_contiguous() else w.float().contiguous()

    def _ok(self, *ts: torch.Tensor) -> bool:
        return all(t.is_cuda and t.dtype in ops.ACT for t in ts)

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if not self._ok(x):
            return super().rms_norm(x, w, eps)
        return ops.rms_norm(x, self._f32(w), eps)

    def rope_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                pos: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rope_qk(q, k, cos, sin, style=style, positions=pos)

    def rope_store(self, kv, layer: int, slots: int | torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   style: str) -> torch.Tensor:
        # the CUDA store's append kernel rotates q and k itself: one launch instead of two
        fused = optional(kv, "kv_store", "write_rotary")
        if fused is not None and fused(layer, slots, q, k, v, cos, sin, pos, style):
            return q
        return super().rope_store(kv, layer, slots, q, k, v, cos, sin, pos, style)

    def qkv_rope_store(self, block, x: torch.Tensor, eps: float, kv, layer: int, slots: int | torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, style: str,
                       head_dim: int) -> torch.Tensor:
        # one launch where the QKV GEMV can rotate and store itself: no bias or q/k norm between
        # the matmul and RoPE, a float cache (luce_cuda.kv.CudaKVStore.rope_store_args)
        qkv, T = block.qkv, x.shape[0]
        target = optional(kv, "kv_store", "rope_store_args")
        if (target is not None and isinstance(qkv, QuantLinear) and block.q_bias is None and block.q_norm is None
                and self._ok(x) and qkv.fuses_rope_store(T) and os.environ.get("LUCE_FUSE_ROPE_STORE", "1") != "0"):
            nq = block.qkv_split[0]
            rs = target(layer, slots, pos, cos, sin, style, nq, x.dtype)
            if rs is not None:
                y = qkv.forward(x, norm=(self._f32(block.attn_norm), eps), rope=rs)
                return y[:, :nq].view(T, nq // head_dim, head_dim)
        return super().qkv_rope_store(block, x, eps, kv, layer, slots, cos, sin, pos, style, head_dim)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(gate, up)

    def linear(self, proj: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
               glu: bool = False) -> torch.Tensor:
        if glu and isinstance(proj, QuantLinear) and self._ok(x):
            return proj.forward(x, glu=True)  # SwiGLU in the GEMV epilogue
        return super().linear(proj, x, glu=glu)  # the projection, then the swiglu kernel

    def norm_linear(self, proj: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, w: torch.Tensor,
                    eps: float, *, glu: bool = False, out_f32: bool = False) -> torch.Tensor:
        if isinstance(proj, QuantLinear) and self._ok(x):
            return proj.forward(x, glu=glu, norm=(self._f32(w), eps), out_f32=out_f32)
        return super().norm_linear(proj, x, w, eps, glu=glu, out_f32=out_f32)

    def linear_residual(self, proj: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        residual: torch.Tensor) -> torch.Tensor:
        if isinstance(proj, QuantLinear) and self._ok(x, residual) and x.dtype == residual.dtype \
                and residual.is_contiguous():
            return proj.forward(x, out=residual, accumulate=True)
        return super().linear_residual(proj, x, residual)

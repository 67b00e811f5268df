"""The ``attention`` role on CUDA: flash-decode and causal flash-prefill over the KV store.

The kernels read the store's per-layer K/V tensors directly (``kv.k[layer]``, ``kv.v[layer]`` of
shape [capacity, n_kv_heads, row]): f16, bf16 or f32 rows, or q8_0 / q4_0 ggml blocks (the format
named by ``kv.spec``), K and V independently. A Hadamard-rotated K (``kv.rotated``) gets the query
rotated inside the decode kernel, from ``kv.hadamard`` (signs and group).

* ``positions`` given (graph-captured decode, chain verification) or one token: the multi-query
  flash-decode kernel, any format, no host sync. Keys are bounded by ``start + T`` (the window
  the reference reads too); query t sees [0, positions[t]], or [0, start + t] without positions.
* causal T > 1 without positions: flash-prefill (FP16 tensor cores) over f16/bf16 caches; over
  other formats, up to DECODE_MAX_T tokens take flash-decode, more take flash-prefill on an f16
  copy of rows [0, start+T) (dequantized by torch).
* a tree mask (``luce_core.tree.TreeMask``, or a bool mask showing every row the whole prefix
  [0, start), converted with one host read): the flash-decode kernels ``_tree``, which read each
  node's path as consecutive logical positions, so a node's rows round exactly as a one-token
  decode step after accepting that path would: DDTree verification stays lossless here.
* any other mask, a head_dim without a kernel, a store without K/V tensors: the torch
  reference, with one warning per cause.
"""
from __future__ import annotations

import warnings

import torch

from luce_core.plugin_api import Caps, ConfigError, KVStore, RunConfig, TreeMask
from luce_cuda import ops

DECODE_MAX_T = 32  # causal chunks this short use flash-decode (rows round as decode steps do)
_DIRECT_PREFILL = (("f16", "f16"), ("bf16", "bf16"))  # caches flash-prefill reads as they are


def _kv_formats(kv: KVStore, head_dim: int) -> tuple[str, str]:
    """(K format, V format) of the store's tensors; uint8 ones are named by kv.spec."""
    spec = getattr(kv, "spec", None)
    k, v = kv.k, kv.v  # type: ignore[attr-defined]
    return (ops.kv_format(k, head_dim, getattr(spec, "k_dtype", None) if k.dtype == torch.uint8 else None),
            ops.kv_format(v, head_dim, getattr(spec, "v_dtype", None) if v.dtype == torch.uint8 else None))


def _as_f16(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Cache rows [n, Hkv, row] of format fmt as f16 [n, Hkv, D] (a view when already f16)."""
    if fmt == "f16":
        return x
    if fmt in ("bf16", "f32"):
        return x.to(torch.float16)
    from luce_core.formats.kv_blocks import DEQUANTIZE

    return DEQUANTIZE[fmt](x).to(torch.float16)


class CudaAttention:
    # Prompt tokens per prefill forward unless the user sets one. Prefill of small models is bound
    # by kernel launches per chunk, and flash prefill keeps activations linear in the chunk: on an
    # H200 SmolLM2 pp4096 went from 26 271 tok/s (512-token chunks) to 210 664 (bench/results).
    prefill_chunk = 4096

    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        self._ref = None
        self._warned: set[str] = set()
        # Split workspaces; never freed, since a captured graph keeps their addresses.
        self._ws: dict[tuple, ops.DecodeWorkspace] = {}
        self._dense: tuple[torch.Tensor, int, TreeMask | None] | None = None  # every layer gets the same mask
        # the rest of the layer as fused kernels (RMSNorm+residual, RoPE on q and k, SwiGLU)
        from luce_cuda.layer_ops import CudaLayerOps
        self.layer_ops = CudaLayerOps()

    def _reference(self):
        if self._ref is None:
            from luce_torch.attention import TorchAttention

            self._ref = TorchAttention()
        return self._ref

    def _fallback(self, why: str, q, kv, layer, start, scale, mask, positions):
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"luce_cuda attention: {why}; using the torch reference for these calls", stacklevel=3)
        extra = {} if positions is None else {"positions": positions}
        return self._reference().forward(q, kv, layer, start, scale=scale, mask=mask, **extra)

    def kernel_reasons(self, q: torch.Tensor, kv: KVStore) -> list[str]:
        return self._plan(q, kv)[0]

    def _plan(self, q: torch.Tensor, kv: KVStore) -> tuple[list[str], str, str]:
        """(reasons the kernels cannot serve this call, K format, V format)."""
        k = getattr(kv, "k", None)
        v = getattr(kv, "v", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)) or k.dim() != 4 or v.dim() != 4:
            return [f"KV store {type(kv).__name__} exposes no [layers, capacity, heads, row] K/V tensors"], "", ""
        if not q.is_cuda or not k.is_cuda or not v.is_cuda:
            return ["tensors are not on a CUDA device"], "", ""
        if q.dtype not in ops.DT_CODE:
            return [f"query dtype {q.dtype}"], "", ""
        d = int(q.shape[-1])
        try:
            kf, vf = _kv_formats(kv, d)
        except ConfigError as e:
            return [e.message], "", ""
        why = ops.attention_supported(d, kf, vf)
        if getattr(kv, "rotated", False):
            h = getattr(kv, "hadamard", None)
            group = getattr(h, "group", 0)
            if not callable(getattr(h, "signs", None)) or group < 1 or group & (group - 1) or d % group:
                why.append("rotated K without a usable hadamard (power-of-two group dividing head_dim, signs)")
        return why, kf, vf

    def _tree_mask(self, mask: torch.Tensor | TreeMask, start: int, device: torch.device) -> TreeMask | None:
        """A bool mask as a TreeMask, converted once per forward (one host read for all layers)."""
        if isinstance(mask, TreeMask):
            return mask
        c = self._dense
        if c is None or c[0] is not mask or c[1] != start:
            c = self._dense = (mask, start, TreeMask.from_dense(mask, start, device))
        return c[2]

    def _workspace(self, q: torch.Tensor, cap: int, n_tokens: int) -> ops.DecodeWorkspace:
        key = (q.shape[1], q.shape[2], cap, n_tokens, q.device)
        ws = self._ws.get(key)
        if ws is None:
            ws = self._ws[key] = ops.DecodeWorkspace(q.shape[1], q.shape[2], cap, q.device, n_tokens=n_tokens)
        return ws

    def forward(self, q: torch.Tensor, kv: KVStore, layer: int, start: int, *, scale: float,
                mask: torch.Tensor | TreeMask | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        why, kf, vf = self._plan(q, kv)
        tree = None
        if mask is not None and not why:
            tree = self._tree_mask(mask, start, q.device)
            if tree is None:
                why = ["a mask that hides part of the prefix from some row"]
        if why:
            return self._fallback("; ".join(why), q, kv, layer, start, scale, mask, positions)
        k, v = kv.k[layer], kv.v[layer]  # type: ignore[attr-defined]
        t = q.shape[0]
        if tree is not None:
            positions = tree.positions
        # Up to DECODE_MAX_T causal rows (a speculative verify run eagerly, a short prompt) take the
        # decode kernel too: each row then rounds exactly as a one-token decode step does.
        if positions is not None or t <= DECODE_MAX_T:
            signs, group = None, 0
            if getattr(kv, "rotated", False):
                h = kv.hadamard  # type: ignore[attr-defined]
                signs, group = h.signs(q.device), h.group
            # graph steps have a fixed T; causal chunks share power-of-two workspaces
            n_tok = t if positions is not None else 1 << (t - 1).bit_length()
            return ops.flash_decode(q, k, v, start + 1, scale, positions=positions, max_len=start + t,
                                    k_fmt=kf, v_fmt=vf, signs=signs, rot_group=group,
                                    workspace=self._workspace(q, k.shape[0], n_tok),
                                    tail=None if tree is None else tree.table,
                                    tail_start=None if tree is None else tree.start)
        end = start + t
        if (kf, vf) not in _DIRECT_PREFILL:  # the prefill kernel reads FP16 operands anyway
            k, v = _as_f16(k[:end], kf), _as_f16(v[:end], vf)
        return ops.flash_prefill(kv.rotate_query(q), k, v, start, scale)

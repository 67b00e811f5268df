"""The ``attention`` role on CUDA: flash-decode and causal flash-prefill over the KV store.

The kernels read the store's memory in the ``dense-v1`` layout (``luce_core.contract.kv_layout``),
which the store hands out as ``kv.tensors``: per layer K/V of shape [capacity, n_kv_heads, row],
f16, bf16 or f32 rows, or q8_0 / q4_0 ggml blocks, K and V independently. A Hadamard-rotated K
gets the query rotated inside the decode kernel (the view's signs and group). Selection pairs
this implementation only with stores that declare dense-v1 (``Impl.reads_kv_layouts``); the view
is looked up once per store, not per call.

* ``positions`` given (graph-captured decode, chain verification) or one token: the multi-query
  flash-decode kernel, any format, no host sync. Keys are bounded by ``start + T`` (the window
  the reference reads too); query t sees [0, positions[t]], or [0, start + t] without positions.
* causal T > 1 without positions: flash-prefill (FP16 tensor cores) over f16/bf16 caches; over
  other formats, up to DECODE_MAX_T tokens take flash-decode, more take flash-prefill on an f16
  copy of rows [0, start+T) (dequantized by torch).
* a tree mask (``luce_core.speculative.tree.TreeMask``, or a bool mask showing every row the whole prefix
  [0, start), converted with one host read): the flash-decode kernels ``_tree``, which read each
  node's path as consecutive logical positions, so a node's rows round exactly as a one-token
  decode step after accepting that path would: DDTree verification stays lossless here.
* any other mask, a head_dim or query dtype without a kernel: the torch reference, with one
  warning per cause. A store without the dense-v1 view is an error (selection never pairs one).
"""
from __future__ import annotations

import warnings

import torch

from luce_core.plugin_api import Caps, ConfigError, KVStore, KVTensors, RunConfig, TreeMask, optional
from luce_cuda import ops

DECODE_MAX_T = 32  # causal chunks this short use flash-decode (rows round as decode steps do)
_DIRECT_PREFILL = (("f16", "f16"), ("bf16", "bf16"))  # caches flash-prefill reads as they are


def _kv_formats(t: KVTensors, head_dim: int) -> tuple[str, str]:
    """(K format, V format) of the view's tensors, checked against their dtypes and rows."""
    return (ops.kv_format(t.k, head_dim, t.k_format if t.k.dtype == torch.uint8 else None),
            ops.kv_format(t.v, head_dim, t.v_format if t.v.dtype == torch.uint8 else None))


def _tensors(kv: KVStore) -> KVTensors:
    """The store's dense-v1 view; a store without one was never meant to reach these kernels."""
    t = optional(kv, "kv_store", "tensors")
    if t is None or t.k.dim() != 4 or t.v.dim() != 4:
        raise ConfigError(f"the CUDA attention reads KV stores of the dense-v1 layout; {type(kv).__name__} "
                          f"provides {'no `tensors`' if t is None else 'tensors that are not [layers, capacity, heads, row]'}",
                          remedy="let selection pair the roles (it refuses this pair), or use --attention torch")
    return t


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

    def exact_rows(self, m: int) -> bool:
        """Rows with positions or a tree mask take the flash-decode kernels, which run each row's
        tiles, splits and merge as a one-token decode step does (tests/test_cuda_attention.py
        checks it bit for bit); up to DECODE_MAX_T rows, like a causal chunk."""
        return m <= DECODE_MAX_T

    def __init__(self, caps: Caps | None = None, config: RunConfig | None = None):
        self._ref = None
        self._warned: set[str] = set()
        # Split workspaces; never freed, since a captured graph keeps their addresses.
        self._ws: dict[tuple, ops.DecodeWorkspace] = {}
        self._dense: tuple[torch.Tensor, int, TreeMask | None] | None = None  # every layer gets the same mask
        # the last store read, its view, and the plans per (query dtype, head_dim, device type):
        # resolved once per store instead of once per layer call
        self._kv: KVStore | None = None
        self._view: KVTensors | None = None
        self._plans: dict[tuple, tuple[list[str], str, str]] = {}

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

    def _bind(self, kv: KVStore) -> KVTensors:
        """Look up a new store's view once; later calls with the same store reuse it."""
        self._view, self._kv, self._plans = _tensors(kv), kv, {}
        return self._view

    def _plan(self, q: torch.Tensor, kv: KVStore) -> tuple[list[str], str, str]:
        """(reasons the kernels cannot serve this call, K format, V format), computed once per
        store and query dtype, head_dim and device type."""
        t = self._view if kv is self._kv else self._bind(kv)
        key = (q.dtype, q.shape[-1], q.is_cuda)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._check(q, t)
        return plan

    def _check(self, q: torch.Tensor, t: KVTensors) -> tuple[list[str], str, str]:
        if not q.is_cuda or not t.k.is_cuda or not t.v.is_cuda:
            return ["tensors are not on a CUDA device"], "", ""
        if q.dtype not in ops.DT_CODE:
            return [f"query dtype {q.dtype}"], "", ""
        d = int(q.shape[-1])
        try:
            kf, vf = _kv_formats(t, d)
        except ConfigError as e:
            return [e.message], "", ""
        why = ops.attention_supported(d, kf, vf)
        if t.rotated:
            group, signs = t.rotation_group, t.signs
            if signs is None or tuple(signs.shape) != (d,) or group & (group - 1) or d % group:
                why.append("rotated K without usable Hadamard signs and group (power of two dividing head_dim)")
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
        view = self._view  # bound by _plan
        k, v = view.k[layer], view.v[layer]
        t = q.shape[0]
        if tree is not None:
            positions = tree.positions
        # Up to DECODE_MAX_T causal rows (a speculative verify run eagerly, a short prompt) take the
        # decode kernel too: each row then rounds exactly as a one-token decode step does.
        if positions is not None or t <= DECODE_MAX_T:
            signs, group = view.signs, view.rotation_group  # None, 0 for an unrotated K
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

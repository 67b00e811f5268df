"""The llama-family transformer (llama, qwen2, qwen3) written against the roles.

The graph knows no kernel: matmuls go through the selected ``linear``, attention through the
selected ``attention``, K/V through a ``kv_storage`` store. Tensor names are GGUF's.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import attrs
import numpy as np
import torch

from luce_core import layer_ops, rope
from luce_core.contract.errors import ConfigError, ModelFileError
from luce_core.contract.roles import Attention, KVStore, Linear, optional
from luce_core.contract.types import LoadedModel, ModelConfig, QTensor
from luce_core.lockstep import LockstepAttention, LockstepKV
from luce_core.speculative.tree import TreeMask

Proj = Callable[[torch.Tensor], torch.Tensor]


@attrs.define
class Block:
    """One layer. Projections that read the same input run as one matmul: ``qkv`` (Q, K, V rows
    concatenated; ``qkv_split`` holds their widths) and ``gate_up`` (gate then up, ``ffn`` wide each)."""

    attn_norm: torch.Tensor
    qkv: Proj
    qkv_split: tuple[int, int, int]
    o: Proj
    ffn_norm: torch.Tensor
    gate_up: Proj
    ffn: int
    down: Proj
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V (column views of one matmul's output) for hidden states h [..., hidden]."""
        return self.split_qkv(self.qkv(h))

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nq, nk, _ = self.qkv_split
        return qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]

    def project_gate_up(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gu = self.gate_up(h)
        return gu[..., : self.ffn], gu[..., self.ffn:]


def fuse_rows(name: str, parts: Sequence[QTensor]) -> list[QTensor]:
    """Matrices with the same input concatenated row-wise into one QTensor, when their storage
    allows it (same type, per-tensor scale and row length: every ggml row is whole blocks), so
    one kernel reads them all; otherwise the parts unchanged."""
    first = parts[0]
    if all(p.qtype == first.qtype and p.scale == first.scale and len(p.shape) == 2
           and p.shape[1] == first.shape[1] and p.data.shape[1] == first.data.shape[1] for p in parts):
        data = np.concatenate([np.asarray(p.data) for p in parts], axis=0)
        return [QTensor(name, first.qtype, (sum(p.shape[0] for p in parts), first.shape[1]), data, first.scale)]
    return list(parts)


def _joined(projs: Sequence[Proj]) -> Proj:
    return projs[0] if len(projs) == 1 else (lambda h: torch.cat([p(h) for p in projs], dim=-1))


@attrs.frozen
class ForwardOut:
    logits: torch.Tensor  # [T, vocab] float32 (only the rows asked for; forward_batch: [B, vocab])
    features: torch.Tensor | None = None  # [T, len(capture) * hidden]: hidden states for drafters ([B, T, ...])

    @staticmethod
    def stack(outs: Sequence["ForwardOut"]) -> "ForwardOut":
        """The outputs of consecutive forwards as one (rows in order)."""
        feats = [o.features for o in outs if o.features is not None]
        return ForwardOut(torch.cat([o.logits for o in outs]), torch.cat(feats) if feats else None)


class Transformer:
    def __init__(self, loaded: LoadedModel, linear: Linear, attention: Attention,
                 device: torch.device, dtype: torch.dtype, max_positions: int,
                 progress: Callable[[Iterable], Iterable] = lambda it: it):
        self.cfg = cfg = loaded.config
        self.device, self.dtype, self.attention = device, dtype, attention
        t = loaded.tensors

        def get(name: str) -> QTensor:
            if name not in t:
                raise ModelFileError(f"{loaded.path}: tensor {name!r} is missing")
            return t[name]

        def vec(name: str) -> torch.Tensor:
            return linear.dequantize(get(name), device, torch.float32)

        def opt_vec(name: str) -> torch.Tensor | None:
            return vec(name) if name in t else None

        self.embed = linear.dequantize(get("token_embd.weight"), device, dtype)
        self.blocks: list[Block] = []
        for i in progress(range(cfg.n_layers)):
            p = f"blk.{i}."
            mats = lambda names, fused: _joined([linear.prepare(w, device, dtype)  # noqa: E731
                                                 for w in fuse_rows(p + fused, [get(p + n + ".weight") for n in names])])
            self.blocks.append(Block(
                attn_norm=vec(p + "attn_norm.weight"),
                qkv=mats(("attn_q", "attn_k", "attn_v"), "attn_qkv.weight"),
                qkv_split=(cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim),
                o=linear.prepare(get(p + "attn_output.weight"), device, dtype), ffn_norm=vec(p + "ffn_norm.weight"),
                gate_up=mats(("ffn_gate", "ffn_up"), "ffn_gate_up.weight"), ffn=cfg.ffn,
                down=linear.prepare(get(p + "ffn_down.weight"), device, dtype),
                q_bias=opt_vec(p + "attn_q.bias"), k_bias=opt_vec(p + "attn_k.bias"), v_bias=opt_vec(p + "attn_v.bias"),
                q_norm=opt_vec(p + "attn_q_norm.weight"), k_norm=opt_vec(p + "attn_k_norm.weight")))
        self.out_norm = vec("output_norm.weight")
        self.lm_head = linear.prepare(t.get("output.weight") or get("token_embd.weight"), device, dtype)
        factors = vec("rope_freqs.weight") if "rope_freqs.weight" in t else None
        self.cos, self.sin = rope.rope_tables(rope.inv_frequencies(cfg, None if factors is None else factors.cpu()), max_positions, device)
        self.scale = cfg.head_dim ** -0.5
        self.ops: layer_ops.LayerOps = optional(linear, "linear", "layer_ops") or layer_ops.TORCH_LAYER_OPS
        self._exact = (optional(linear, "linear", "exact_rows"), optional(attention, "attention", "exact_rows"))

    def exact_rows(self, m: int) -> bool:
        """Whether a forward of m rows given ``positions`` or a ``TreeMask`` rounds every row bit
        for bit as the one-token decode step at that row's position (after its path) would: both
        the linear and the attention implementation declare it (``exact_rows``, optional)."""
        linear, attention = self._exact
        return attention is not None and attention(m) and (m == 1 or (linear is not None and linear(m)))

    @property
    def config(self) -> ModelConfig:
        return self.cfg

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, kv: KVStore, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | TreeMask | None = None,
                logits_rows: slice | torch.Tensor | None = None,
                capture: Sequence[int] = (), verify: bool = False) -> ForwardOut:
        """Run ``tokens`` [T] occupying KV slots [start, start+T).

        positions (default start..start+T-1) drive RoPE, so tree verification can give siblings
        the same depth; mask (bool [T, start+T], or a ``TreeMask``) replaces the causal mask. logits_rows limits the
        LM head to some rows (prefill needs only the last). capture lists layer indices whose
        input hidden states (and, for index n_layers, the final pre-norm output) are returned.
        ``verify`` (no mask): the rows are a speculative chain verify, so attention gets them as
        positions (each query sees the slots up to its own, computed as a decode step would),
        not as a causal prefill chunk.
        """
        T = tokens.shape[0]
        pos = torch.arange(start, start + T, device=self.device) if positions is None else positions.to(self.device)
        return self._run(tokens.to(self.device), pos, kv, self.attention, start, start, mask, logits_rows, capture,
                         positions=pos if verify and mask is None else None)

    @torch.inference_mode()
    def decode_static(self, tokens: torch.Tensor, pos: torch.Tensor, kv: KVStore, window: int,
                      capture: Sequence[int] = (), *, slots: torch.Tensor | None = None,
                      mask: TreeMask | None = None) -> ForwardOut:
        """Decode (or chain-verify) T consecutive tokens with static shapes, for CUDA-graph capture.

        tokens and pos are device tensors [T] (no host sync reads them); each token's K/V goes to
        slot pos[i] via ``kv.write_at`` and attention, given the positions, lets each query see
        the slots up to its own (``window`` bounds what a reference implementation reads).
        A tree verify gives its K/V ``slots`` (pos are then depths after the prefix) and its
        ``TreeMask``. Returns logits [T, vocab] (and the ``capture`` features, as ``forward``).
        """
        return self._run(tokens, pos, kv, self.attention, pos if slots is None else slots, window - tokens.shape[0],
                         mask, None, capture, positions=pos)

    def lockstep_kv(self, batch: int, length: int, dtype: torch.dtype | None = None) -> LockstepKV:
        """An empty K/V cache for ``forward_batch``: ``batch`` sequences of up to ``length``
        positions, in ``dtype`` (default: the compute dtype)."""
        if length > self.cos.shape[0]:
            raise ConfigError(f"{length} positions exceed the model's RoPE table ({self.cos.shape[0]} positions)",
                              remedy="load the target with a larger ctx")
        return LockstepKV.empty(self.cfg, batch, length, dtype or self.dtype, self.device)

    @torch.inference_mode()
    def forward_batch(self, tokens: torch.Tensor, start: int, kv: LockstepKV, positions: torch.Tensor,
                      key_ok: torch.Tensor, capture: Sequence[int] = ()) -> ForwardOut:
        """Run B sequences in lockstep: tokens [B, T] at cache columns start .. start+T-1 of
        ``kv`` (``lockstep_kv``), RoPE positions [B, T]; key_ok [B, start+T] marks each
        sequence's real columns (left padding is not one). The same layers as ``forward``, over
        the B*T rows. Returns the logits of each sequence's last column [B, vocab] and the
        ``capture`` features of every row [B, T, len(capture) * hidden]."""
        B, T = tokens.shape
        out = self._run(tokens.reshape(-1), positions.reshape(-1), kv, LockstepAttention(self.cfg, key_ok, start, T),
                        start, start, None, torch.arange(T - 1, B * T, T, device=tokens.device), capture)
        return ForwardOut(out.logits, None if out.features is None else out.features.view(B, T, -1))

    def _run(self, tokens: torch.Tensor, pos: torch.Tensor, kv: KVStore | LockstepKV,
             attention: Attention | LockstepAttention, slots: int | torch.Tensor, attn_start: int,
             mask: torch.Tensor | TreeMask | None, logits_rows: slice | torch.Tensor | None,
             capture: Sequence[int], positions: torch.Tensor | None = None) -> ForwardOut:
        cfg, ops = self.cfg, self.ops
        T = tokens.shape[0]
        hd = cfg.head_dim
        eps = cfg.rms_eps
        x = self.embed_tokens(tokens)  # the residual stream; each norm is fused into the matmul after it
        feats: list[torch.Tensor] = []
        for i, b in enumerate(self.blocks):
            if i in capture:
                feats.append(x.clone())  # ops may update x in place below
            # q, and K/V to slots [start, start+T) (``forward``) or pos (``decode_static``)
            q = ops.qkv_rope_store(b, x, eps, kv, i, slots, self.cos, self.sin, pos, cfg.rope_style, hd)
            a = attention.forward(q, kv, i, attn_start, scale=self.scale, mask=mask, positions=positions)
            x = ops.linear_residual(b.o, a.reshape(T, cfg.n_heads * hd), x)
            g = ops.norm_linear(b.gate_up, x, b.ffn_norm, eps, glu=True)  # SwiGLU fused in where it can
            x = ops.linear_residual(b.down, g, x)
        if cfg.n_layers in capture:
            feats.append(x)
        rows = x if logits_rows is None else x[logits_rows]
        logits = ops.norm_linear(self.lm_head, rows, self.out_norm, eps, out_f32=True)
        return ForwardOut(logits, torch.cat(feats, dim=-1) if feats else None)

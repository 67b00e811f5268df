"""DFlash at drafting time: ``FusedForward`` (the drafter's forward with fused frozen weights and
the target's layer ops) and ``DFlashDrafter`` (the drafter role: binding, the context K/V cache,
proposals).

``FusedForward`` is the math of ``DFlashModel.context_kv`` and ``denoise`` (one block) in a few
dozen launches instead of ~270. Training needs autograd and many blocks per context, so
``DFlashModel`` keeps one plain-torch formulation of it. Drafting runs one block at a time with
frozen weights, and there launches are the cost (a 135M target's whole decode step is ~550 µs on
an H200). Here:

* weights are concatenated once: Q|K|V and gate|up per layer, and the context K|V projections
  of *all* layers (so a committed row's K/V for every layer is one matmul);
* RMSNorm, RoPE (q and k together, in place) and SwiGLU go through the target's ``LayerOps``
  (luce_cuda: one kernel each; on CPU the torch reference, the functions ``DFlashModel`` uses);
* residual adds ride in the projection (``addmm``); the MASK rows' input projection is computed
  once; the GQA group is folded into the query axis instead of repeating K/V;
* the target's head runs as in its own forward (``norm_linear``: RMSNorm + LM head, f32 out).

The results equal ``DFlashModel``'s up to rounding order (tests/test_dflash.py compares them).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from luce_core.plugin_api import (ConfigError, DrafterOptions, DraftRequest, LayerOps, Proposal, SamplingParams,
                                  Target, common_prefix, probabilities, rope_tables)
from luce_drafters.dflash.config import DFlashConfig, check_target
from luce_drafters.dflash.files import load_drafter, save_drafter
from luce_drafters.dflash.graph import GraphedDraftStep
from luce_drafters.dflash.model import DFlashModel, build_model, inv_frequencies, untrained


class FusedForward:
    """Frozen, fused weights of a ``DFlashModel`` for drafting with the target's layer ops."""

    def __init__(self, model: DFlashModel, ops: LayerOps, positions: int):
        c = model.cfg
        self.cfg, self.ops = c, ops
        w = lambda lin: lin.weight.detach()  # noqa: E731
        f32 = lambda p: p.detach().float()  # noqa: E731  (the norm kernels read f32 weights)
        self.layers = [dict(attn_norm=f32(L.attn_norm), ffn_norm=f32(L.ffn_norm),
                            qkv=torch.cat([w(L.q), w(L.k), w(L.v)]), o_t=w(L.o).t(),
                            gate_up=torch.cat([w(L.gate), w(L.up)]), down_t=w(L.down).t())
                       for L in model.layers]
        # context K of every layer first, then every V: the K half is one [T, layers*kvh, hd] view
        self.ctx_kv = torch.cat([w(L.k) for L in model.layers] + [w(L.v) for L in model.layers])
        self.fc, self.fc_norm = w(model.fc), f32(model.fc_norm)
        self.in_proj = w(model.in_proj)
        with torch.no_grad():
            self.mask_row = model.in_proj(model.mask_emb.to(self.in_proj.dtype)[None])[0]
        self.norm, self.out_proj = f32(model.norm), w(model.out_proj)
        self.cos, self.sin = rope_tables(inv_frequencies(c), positions, self.fc.device)

    def context_rows(self, feats: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (roped at ``pos`` [T]) and V [layers, T, kvh, hd] of committed rows with target
        features ``feats`` [T, feature_width]."""
        c, ops = self.cfg, self.ops
        T, nl = feats.shape[0], c.n_layers
        ctx = ops.rms_norm(feats.to(self.fc.dtype) @ self.fc.t(), self.fc_norm, c.rms_eps)
        kv = (ctx @ self.ctx_kv.t()).view(T, 2, nl * c.n_kv_heads, c.head_dim)
        k, _ = ops.rope_qk(kv[:, 0], kv[:, 0, :0], self.cos, self.sin, pos, "neox")  # only K rotates: empty "k"
        k = k.view(T, nl, c.n_kv_heads, c.head_dim).transpose(0, 1)
        return k, kv[:, 1].view(T, nl, c.n_kv_heads, c.head_dim).transpose(0, 1)

    def block_hidden(self, first: torch.Tensor, pos: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                     ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [block, target_hidden] of the block [first, MASK...] at positions ``pos``
        [block], attending to context K/V [layers, S, kvh, hd] (``ctx_mask`` [S] True = visible)
        and to the whole block."""
        c, ops = self.cfg, self.ops
        B, H, KV, hd = c.block, c.n_heads, c.n_kv_heads, c.head_dim
        g = H // KV
        x = torch.cat([first.to(self.in_proj.dtype) @ self.in_proj.t(), self.mask_row.expand(B - 1, -1)])
        mask = None
        if ctx_mask is not None:
            mask = torch.cat([ctx_mask, ctx_mask.new_ones(B)])[None, None, None]
        for i, L in enumerate(self.layers):
            qkv = ops.rms_norm(x, L["attn_norm"], c.rms_eps) @ L["qkv"].t()
            q = qkv[:, : H * hd].view(B, H, hd)
            k = qkv[:, H * hd:(H + KV) * hd].view(B, KV, hd)
            q, k = ops.rope_qk(q, k, self.cos, self.sin, pos, "neox")
            v = qkv[:, (H + KV) * hd:].view(B, KV, hd)
            kk = torch.cat([ctx_k[i].to(k.dtype), k]).transpose(0, 1)  # [KV, S+B, hd]
            vv = torch.cat([ctx_v[i].to(v.dtype), v]).transpose(0, 1)
            qf = q.reshape(B, KV, g, hd).permute(1, 2, 0, 3).reshape(1, KV, g * B, hd)
            a = F.scaled_dot_product_attention(qf, kk[None], vv[None], attn_mask=mask, scale=hd ** -0.5)
            a = a.view(KV, g, B, hd).permute(2, 0, 1, 3).reshape(B, H * hd)
            x = torch.addmm(x, a, L["o_t"])
            gu = ops.rms_norm(x, L["ffn_norm"], c.rms_eps) @ L["gate_up"].t()
            x = torch.addmm(x, ops.swiglu(gu[:, : c.ffn], gu[:, c.ffn:]), L["down_t"])
        return ops.rms_norm(x, self.norm, c.rms_eps) @ self.out_proj.t()


class DFlashDrafter:
    name = "dflash"
    supports_tree = True

    def __init__(self, caps: Any = None, config: Any = None):
        self.capture: tuple[int, ...] = ()
        self.model: DFlashModel | None = None
        self.use_graphs = True if config is None else bool(config.cuda_graphs)

    def bind(self, target: Target, options: DrafterOptions) -> None:
        if not options.draft_model:
            raise ConfigError("the dflash drafter needs its weights",
                              remedy="pass --draft-model FILE (.safetensors or .gguf from `luce train-drafter`)")
        cfg, state = load_drafter(options.draft_model)
        self.bind_model(target, cfg, build_model(cfg, state), where=str(options.draft_model))

    def spec_options(self, target: Target, workdir: str) -> DrafterOptions:
        """For the role's conformance spec: options naming an untrained drafter sized for
        ``target`` (random weights are enough for the protocol properties it checks)."""
        path = f"{workdir}/spec-dflash.safetensors"
        save_drafter(path, *untrained(target.model.cfg, block=4))
        return DrafterOptions(draft_model=path)

    def bind_model(self, target: Target, cfg: DFlashConfig, model: DFlashModel, where: str = "(in memory)") -> None:
        check_target(cfg, target.model.cfg, where)
        tm = target.model
        self.cfg, self.target = cfg, tm
        self.model = model.to(tm.device, tm.dtype).eval()
        self.capture = cfg.capture
        shape = (cfg.n_layers, target.ctx, cfg.n_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=tm.dtype, device=tm.device)
        self.v_cache = torch.zeros(shape, dtype=tm.dtype, device=tm.device)
        self.fused = FusedForward(self.model, tm.ops, target.ctx + cfg.block)
        # context rows [valid_from, cached) have K/V in the cache (rows before the window are skipped)
        self.valid_from = self.cached = 0
        self._ctx_tokens: list[int] = []
        self._graph: GraphedDraftStep | None = None  # made on the first step on a CUDA target

    def truncate(self, n: int) -> None:
        """Feature rows from ``n`` on may change: forget their K/V."""
        self.cached = min(self.cached, n)
        if self.cached <= self.valid_from:
            self.valid_from = self.cached = 0

    def graph_step(self) -> GraphedDraftStep:
        """The static-shape drafting step over this drafter's weights, K/V cache and target head."""
        return GraphedDraftStep(self.fused, self.k_cache, self.v_cache, self.target.embed_tokens, self.head)

    @torch.inference_mode()
    def block_logits(self, tokens: Sequence[int], features: Any, rows: int | None = None) -> torch.Tensor:
        """Draft logits [rows, vocab] (f32; rows defaults to block-1, the whole block) for
        positions len(tokens) .. after ``tokens`` (on CUDA a graph's output buffer: use it
        before the next call)."""
        rows = self.cfg.block - 1 if rows is None else min(rows, self.cfg.block - 1)
        assert self.model is not None
        cfg, tm = self.cfg, self.target
        n = len(tokens) - 1  # committed positions; tokens[-1] is pending
        # cached K/V is valid only for the prefix this call shares with the one it was built for:
        # check it here rather than trust every caller to report rollbacks
        self.truncate(common_prefix(self._ctx_tokens, tokens[:n]))
        self._ctx_tokens = list(tokens[:n])
        lo = max(0, n - cfg.window)
        if not self.valid_from <= lo <= self.cached:  # the window left the cached range: start over
            self.valid_from = self.cached = lo
        new = self.cached
        if n > new and (features is None or features.length < n):
            raise ConfigError("the dflash drafter has no target features for the context",
                              remedy="run it through luce's speculative decoder (it captures them)")
        if self.use_graphs and tm.device.type == "cuda":
            if self._graph is None:
                self._graph = self.graph_step()
            if self._graph.fits(new, n):  # a decode step's few new rows: one graph replay
                feats = features.read(new, n).to(tm.device, tm.dtype) if n > new else None
                self.cached = n
                return self._graph.run(feats, new, n, int(tokens[-1]), rows)
        dev = tm.device
        if n > new:  # eagerly: the prompt's rows, or a CPU target
            k, v = self.fused.context_rows(features.read(new, n).to(dev), torch.arange(new, n, device=dev))
            self.k_cache[:, new:n] = k
            self.v_cache[:, new:n] = v
        self.cached = n
        first = tm.embed_tokens(torch.tensor([int(tokens[-1])], device=dev))
        h = self.fused.block_hidden(first, n + torch.arange(cfg.block, device=dev),
                                    self.k_cache[:, lo:n], self.v_cache[:, lo:n])
        return self.head(h[1:1 + rows])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """f32 logits of drafter hidden states through the target's final norm and LM head (as
        the target's own forward runs them: one fused launch where the backend has one)."""
        tm = self.target
        return tm.ops.norm_linear(tm.lm_head, h.to(tm.dtype), tm.out_norm, tm.cfg.rms_eps, out_f32=True)

    def propose(self, tokens: Sequence[int], budget: int, *, request: DraftRequest | None = None) -> Proposal:
        if self.model is None:
            raise ConfigError("the dflash drafter was used before bind()")
        k = min(budget, self.cfg.block - 1) if request is None else min(budget, self.cfg.block - 1, request.max_depth)
        if request is not None and request.tree:
            k = min(self.cfg.block - 1, request.max_depth)  # tree: depth from the block, width from budget
        if k <= 0:
            return Proposal()
        logits = self.block_logits(tokens, None if request is None else request.features, k)
        params = request.params if request is not None else SamplingParams()
        if request is not None and request.tree:
            lp = torch.log_softmax(logits / request.tree_temp, dim=-1)
            return Proposal(tokens=tuple(torch.argmax(logits, -1).tolist()), logprobs=lp)
        if params.greedy:
            return Proposal(tokens=tuple(torch.argmax(logits, -1).tolist()))
        q = torch.stack([probabilities(row, params) for row in logits]).cpu()
        toks = torch.multinomial(q, 1, generator=request.generator)[:, 0] if request is not None else q.argmax(-1)
        return Proposal(tokens=tuple(toks.tolist()), probs=q)

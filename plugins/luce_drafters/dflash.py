"""DFlash: a block drafter conditioned on the target's hidden states.

The drafter is a small transformer that fills in a whole block in one forward:

* **Target features.** The target captures the hidden states entering the layers listed in
  ``capture`` (``Transformer.forward`` capture indices: ``i`` = input of layer ``i`` = output of
  layer ``i-1``; ``n_layers`` = the final pre-norm hidden) at every committed position; they live
  in the feature mirror. The drafter projects their concatenation to its width:
  ``ctx = RMSNorm(fc(concat(features)))``.
* **Block.** Input is ``[pending token, MASK x (block-1)]`` at positions ``n .. n+block-1``: the
  pending token through the *target's* embedding, MASK a learned vector, then ``in_proj`` to
  the drafter width.
* **Layers.** Pre-norm attention + SwiGLU. Queries come from the block only; keys/values are
  ``concat(W_k ctx, W_k block)`` - the context rows do not change across layers, so their K/V
  per layer are computed once per committed position and cached. Attention is non-causal inside
  the block and sees the last ``window`` context positions. RoPE (rotate-half) at absolute
  positions.
* **Head.** ``out_proj`` back to the target's hidden size, then the *target's* output norm and
  LM head. Rows 1..block-1 give the draft distributions of positions n+1 .. n+block-1: one
  forward drafts ``block - 1`` tokens.

``DFlashModel`` is the trainable formulation (many blocks per context, autograd);
drafting runs the same math through ``dflash_infer.FastDrafter`` (fused weights, the target's
layer kernels) and ``dflash_graph`` (one CUDA graph per step).

Files: safetensors (state dict + ``__metadata__`` {"format": "luce-dflash", "config": JSON of
:class:`DFlashConfig`}) or GGUF (architecture ``luce-dflash``, key ``luce-dflash.config`` = the
same JSON, tensors F32/F16 under the state-dict names). ``load_drafter`` tells them apart by magic.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import attrs
import torch

from luce_core.formats.dtypes import TORCH_DTYPES
import torch.nn.functional as F
from torch import nn

from luce_core.plugin_api import (ConfigError, DrafterOptions, DraftRequest, ModelFileError, Proposal,
                                  Target, common_prefix)

FORMAT = "luce-dflash"
CONFIG_VERSION = 1


def default_capture(n_layers: int, k: int = 5) -> tuple[int, ...]:
    """Up to ``k`` capture indices spread over the target: outputs of layers 1 .. n_layers-1
    (as lucebox takes layers {1, 16, 31, 46, 61} of 64), as forward capture indices (+1)."""
    if n_layers < 1:
        raise ConfigError(f"a target with {n_layers} layers has no hidden states to capture")
    if n_layers == 1:
        return (1,)
    k = min(k, n_layers - 1)
    outs = sorted({round(1 + i * (n_layers - 2) / max(k - 1, 1)) for i in range(k)})
    return tuple(o + 1 for o in outs)


def _positive(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"DFlash {attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class DFlashConfig:
    """Shape of a DFlash drafter and the target it was trained for."""

    target_hidden: int = attrs.field(validator=_positive)
    target_vocab: int = attrs.field(validator=_positive)
    target_layers: int = attrs.field(validator=_positive)
    capture: tuple[int, ...] = attrs.field(converter=lambda c: tuple(int(x) for x in c))
    width: int = attrs.field(default=256, validator=_positive)  # drafter hidden size
    n_layers: int = attrs.field(default=2, validator=_positive)
    n_heads: int = attrs.field(default=4, validator=_positive)
    n_kv_heads: int = attrs.field(default=2, validator=_positive)
    head_dim: int = attrs.field(default=64, validator=_positive)
    ffn: int = attrs.field(default=768, validator=_positive)
    block: int = attrs.field(default=8, validator=_positive)  # pending token + block-1 masks
    window: int = attrs.field(default=512, validator=_positive)  # context positions attended
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    target_name: str = ""
    version: int = CONFIG_VERSION

    def __attrs_post_init__(self) -> None:
        if self.block < 2:
            raise ConfigError(f"DFlash block size must be >= 2 (the pending token + at least one draft), "
                              f"got {self.block}",
                              remedy="use --block 2 or more (8 or 16 are typical)")
        if not self.capture:
            raise ConfigError("DFlash needs at least one captured target layer")
        bad = [c for c in self.capture if not 0 <= c <= self.target_layers]
        if bad:
            raise ConfigError(f"DFlash capture indices {bad} are outside 0..{self.target_layers} "
                              f"(the target has {self.target_layers} layers)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"DFlash n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"DFlash head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def feature_width(self) -> int:
        return len(self.capture) * self.target_hidden

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DFlashConfig":
        d = json.loads(text)
        if int(d.get("version", 0)) != CONFIG_VERSION:
            raise ModelFileError(f"DFlash drafter config version {d.get('version')} is not supported "
                                 f"(want {CONFIG_VERSION})",
                                 remedy="retrain the drafter with this luce (luce train-drafter)")
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rope_cs(pos: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., T, 1, D/2] for positions pos [..., T]: computed once, used by every layer."""
    ang = pos.to(torch.float32)[..., None] * inv  # [..., T, D/2]
    return torch.cos(ang)[..., None, :], torch.sin(ang)[..., None, :]


def _rope(x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate-half RoPE of x [..., T, H, D] with cs = _rope_cs(positions)."""
    c, s = cs
    h = x.shape[-1] // 2
    a, b = x[..., :h].float(), x[..., h:].float()
    return torch.cat((a * c - b * s, a * s + b * c), dim=-1).to(x.dtype)


class _Layer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        w, hd = cfg.width, cfg.head_dim
        self.attn_norm = nn.Parameter(torch.ones(w))
        self.q = nn.Linear(w, cfg.n_heads * hd, bias=False)
        self.k = nn.Linear(w, cfg.n_kv_heads * hd, bias=False)
        self.v = nn.Linear(w, cfg.n_kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.n_heads * hd, w, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(w))
        self.gate = nn.Linear(w, cfg.ffn, bias=False)
        self.up = nn.Linear(w, cfg.ffn, bias=False)
        self.down = nn.Linear(cfg.ffn, w, bias=False)


class DFlashModel(nn.Module):
    """The drafter's own weights. The target's embedding and head are passed in, not owned."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.feature_width, cfg.width, bias=False)
        self.fc_norm = nn.Parameter(torch.ones(cfg.width))
        self.in_proj = nn.Linear(cfg.target_hidden, cfg.width, bias=False)
        self.mask_emb = nn.Parameter(torch.zeros(cfg.target_hidden))
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.ones(cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.target_hidden, bias=False)
        inv = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
        with torch.no_grad():
            self.mask_emb.copy_(torch.randn(self.mask_emb.shape, generator=g) * 0.02)

    # -------------------------------------------------------------- pieces shared by train/infer
    def context(self, feats: torch.Tensor) -> torch.Tensor:
        """Target features [..., S, feature_width] -> drafter context rows [..., S, width]."""
        return _rms(self.fc(feats.to(self.fc.weight.dtype)), self.fc_norm, self.cfg.rms_eps)

    def context_kv(self, ctx: torch.Tensor, pos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K [..., S, kvh, hd] roped at ``pos`` [..., S], V) of context rows."""
        c = self.cfg
        cs = _rope_cs(pos, self.inv_freq)
        out = []
        for layer in self.layers:
            k = layer.k(ctx).unflatten(-1, (c.n_kv_heads, c.head_dim))
            v = layer.v(ctx).unflatten(-1, (c.n_kv_heads, c.head_dim))
            out.append((_rope(k, cs), v))
        return out

    def denoise(self, first: torch.Tensor, pos0: torch.Tensor, ctx_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [A, block, target_hidden] of the block [first, MASK...] at positions
        pos0 [A] .. pos0+block-1, attending to context K/V ([A, S, kvh, hd] per layer; ctx_mask
        [A, S] True = visible) and to the whole block (non-causal)."""
        return self.denoise_blocks(first[:, None], pos0[:, None], ctx_kv,
                                   None if ctx_mask is None else ctx_mask[:, None])[:, 0]

    def denoise_blocks(self, first: torch.Tensor, pos0: torch.Tensor,
                       ctx_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """K blocks per row sharing one context: hidden states [A, K, block, target_hidden] of the
        blocks [first[a, k], MASK...] at positions pos0 [A, K] .. +block-1. Every block attends to
        the context rows its ctx_mask [A, K, S] allows (None: all) and to its own rows
        (non-causal), never to another block. Inference drafts one block (K = 1); training packs
        many anchors of a sequence over that sequence's context, computed once."""
        c = self.cfg
        A, K, B = first.shape[0], first.shape[1], c.block
        dt = self.in_proj.weight.dtype
        x = torch.cat([first[:, :, None, :].to(dt), self.mask_emb.to(dt).expand(A, K, B - 1, -1)], dim=2)
        x = self.in_proj(x).flatten(1, 2)  # [A, K*B, width]
        pos = (pos0[:, :, None] + torch.arange(B, device=x.device)).flatten(1)
        group = c.n_heads // c.n_kv_heads
        mask = None
        if ctx_mask is not None or K > 1:
            S = ctx_kv[0][0].shape[1]
            cm = (ctx_mask if ctx_mask is not None
                  else torch.ones((A, K, S), dtype=torch.bool, device=x.device))
            ctx_part = cm[:, :, None, :].expand(A, K, B, S).reshape(A, K * B, S)
            own = torch.eye(K, dtype=torch.bool, device=x.device)
            own = own[:, None, :, None].expand(K, B, K, B).reshape(K * B, K * B)
            mask = torch.cat([ctx_part, own.expand(A, -1, -1)], dim=-1)[:, None]  # [A, 1, K*B, S+K*B]
        cs = _rope_cs(pos, self.inv_freq)
        for layer, (ck, cv) in zip(self.layers, ctx_kv):
            h = _rms(x, layer.attn_norm, c.rms_eps)
            q = _rope(layer.q(h).unflatten(-1, (c.n_heads, c.head_dim)), cs)
            k = _rope(layer.k(h).unflatten(-1, (c.n_kv_heads, c.head_dim)), cs)
            v = layer.v(h).unflatten(-1, (c.n_kv_heads, c.head_dim))
            kk = torch.cat([ck.to(k.dtype), k], dim=1).transpose(1, 2).repeat_interleave(group, dim=1)
            vv = torch.cat([cv.to(v.dtype), v], dim=1).transpose(1, 2).repeat_interleave(group, dim=1)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask,
                                               scale=c.head_dim ** -0.5)
            x = x + layer.o(a.transpose(1, 2).flatten(-2))
            h = _rms(x, layer.ffn_norm, c.rms_eps)
            x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h))
        return self.out_proj(_rms(x, self.norm, c.rms_eps)).unflatten(1, (K, B))


# ----------------------------------------------------------------------------- files
def save_drafter(path: str | os.PathLike[str], cfg: DFlashConfig, model: DFlashModel, dtype: str = "f32") -> None:
    """Write a drafter as .safetensors or .gguf (by extension), weights in f32 or f16."""
    tdt = TORCH_DTYPES[dtype]
    state = {k: v.detach().to("cpu", tdt).contiguous() for k, v in model.state_dict().items()}
    path = str(path)
    if path.endswith(".gguf"):
        import gguf

        w = gguf.GGUFWriter(path, FORMAT)
        w.add_string(f"{FORMAT}.config", cfg.to_json())
        for k, v in state.items():
            w.add_tensor(k, v.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    else:
        from safetensors.torch import save_file

        save_file(state, path, metadata={"format": FORMAT, "config": cfg.to_json()})


def load_drafter(path: str | os.PathLike[str]) -> tuple[DFlashConfig, dict[str, torch.Tensor]]:
    path = str(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"DFlash drafter file not found: {path}",
                             remedy="train one with `luce train-drafter --target MODEL.gguf --out FILE`")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        import gguf

        r = gguf.GGUFReader(path)
        field = r.fields.get(f"{FORMAT}.config")
        if field is None:
            raise ModelFileError(f"{path} is a GGUF but not a luce DFlash drafter (no {FORMAT}.config)",
                                 remedy="pass a file written by `luce train-drafter`")
        cfg = DFlashConfig.from_json(bytes(field.parts[field.data[0]]).decode("utf-8"))
        state = {t.name: torch.from_numpy(t.data.copy()).reshape([int(d) for d in reversed(t.shape)])
                 for t in r.tensors}
        return cfg, state
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except SafetensorError as e:
        raise ModelFileError(f"{path} is neither a GGUF nor a safetensors file ({e})",
                             remedy="pass a file written by `luce train-drafter`") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ModelFileError(f"{path} is a safetensors file but not a luce DFlash drafter",
                             remedy="pass a file written by `luce train-drafter`")
    return DFlashConfig.from_json(meta["config"]), state


def build_model(cfg: DFlashConfig, state: dict[str, torch.Tensor]) -> DFlashModel:
    m = DFlashModel(cfg)
    missing, unexpected = m.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ModelFileError(f"DFlash drafter weights do not match its config: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}", remedy="the file is corrupt; retrain it")
    return m


def check_target(cfg: DFlashConfig, target_cfg: Any, where: str) -> None:
    """ConfigError unless the drafter was trained for a target of this shape."""
    pairs = [("hidden size", cfg.target_hidden, target_cfg.hidden), ("vocabulary", cfg.target_vocab, target_cfg.vocab),
             ("layer count", cfg.target_layers, target_cfg.n_layers)]
    for what, mine, theirs in pairs:
        if mine != theirs:
            raise ConfigError(f"the DFlash drafter {where} was trained for a target with {what} {mine}, "
                              f"but this target has {theirs}",
                              remedy="train a drafter for this model: "
                                     "luce train-drafter --target MODEL.gguf --out FILE")


# ----------------------------------------------------------------------------- the drafter
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
        from luce_drafters.testing import random_dflash

        path = random_dflash(target.model, f"{workdir}/spec-dflash.safetensors", block=4)
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
        from luce_drafters.dflash_infer import FastDrafter
        self.fast = FastDrafter(self.model, tm.ops, target.ctx + cfg.block)
        # context rows [valid_from, cached) have K/V in the cache (rows before the window are skipped)
        self.valid_from = self.cached = 0
        self._ctx_tokens: list[int] = []
        self._graph = None  # GraphedDraftStep, made on the first step on a CUDA target

    def truncate(self, n: int) -> None:
        """Feature rows from ``n`` on may change: forget their K/V."""
        self.cached = min(self.cached, n)
        if self.cached <= self.valid_from:
            self.valid_from = self.cached = 0

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
                from luce_drafters.dflash_graph import GraphedDraftStep
                self._graph = GraphedDraftStep(self)
            if self._graph.fits(new, n):  # a decode step's few new rows: one graph replay
                feats = features.read(new, n).to(tm.device, tm.dtype) if n > new else None
                self.cached = n
                return self._graph.run(feats, new, n, int(tokens[-1]), rows)
        dev = tm.device
        if n > new:  # eagerly: the prompt's rows, or a CPU target
            k, v = self.fast.context_rows(features.read(new, n).to(dev), torch.arange(new, n, device=dev))
            self.k_cache[:, new:n] = k
            self.v_cache[:, new:n] = v
        self.cached = n
        first = tm.embed_tokens(torch.tensor([int(tokens[-1])], device=dev))
        h = self.fast.block_hidden(first, n + torch.arange(cfg.block, device=dev),
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
        from luce_core.plugin_api import SamplingParams, probabilities

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


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(cfg: DFlashConfig) -> str:
    m = DFlashModel(cfg)
    return (f"DFlash drafter: {cfg.n_layers} layers, width {cfg.width}, {cfg.n_heads}/{cfg.n_kv_heads} heads x "
            f"{cfg.head_dim}, ffn {cfg.ffn}, block {cfg.block}, window {cfg.window}, capture {list(cfg.capture)}, "
            f"{parameter_count(m) / 1e6:.2f} M parameters")


__all__ = ["DFlashConfig", "DFlashModel", "DFlashDrafter", "default_capture", "save_drafter", "load_drafter",
           "build_model", "check_target", "describe"]

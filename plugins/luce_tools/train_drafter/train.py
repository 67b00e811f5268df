"""``luce train-drafter``: distill a DFlash drafter from the target's own greedy generations.

Recipe:

1. **Prompts.** ``--prompts FILE`` (one per line; ``\\n`` escapes allowed) or the built-in set
   (``prompts``: 7,587 prompts - chat tasks x 229 topics, code requests, raw code
   openings; ``--variants 2`` renders each chat prompt under a second system message too, 14,937
   in all). Prompts are split *by group* (topic): ``--heldout-frac`` of the groups is held out
   whole, so the held-out numbers measure new subjects. Chat prompts go through the model's chat
   template (unless ``--no-chat``).
2. **Data, batched.** :class:`~luce_tools.train_drafter.batched_gen.BatchedGreedy` decodes ``--gen-batch``
   prompts at once with the target's own weights (T=0, up to ``--gen-tokens`` each, a stop token
   kept as the last token) and keeps the hidden states of the ``capture`` layers at every
   position. Held-out prompts first, then training prompts until ``--data-frac`` of
   ``--time-budget`` is spent (or all are done).
3. **Samples.** An anchor is a position ``n`` holding a generated token. The drafter sees the
   features of the ``window`` positions before ``n`` and the block ``[token n, MASK x
   (block-1)]``; its targets are the target's tokens ``n+1 .. n+block-1`` (positions past the
   sequence end are masked out of the loss). A step packs ``--anchors-per-seq`` anchors of each of
   ``batch / anchors-per-seq`` sequences (drawn in proportion to their anchors) over that
   sequence's context, computed once (``DFlashModel.denoise_blocks``).
4. **Loss.** Cross-entropy through the target's output norm and LM head (frozen), block
   position ``i`` weighted ``exp(-(i-1)/decay)`` (``--decay 0``: uniform): early positions
   decide how far a chain gets.
5. **Optimizer.** AdamW (``--lr``, ``--weight-decay``, betas 0.9/0.95), linear warm-up then cosine
   to a tenth over ``--steps`` or the time left, whichever ends first; gradient clipping at 1;
   bf16 autocast on CUDA. Every ``--eval-every`` steps the held-out validation loss is measured
   on ``--val-seqs`` held-out sequences; the best weights are the ones written.
6. **Report.** Teacher-forced per-position accuracy on the validation sequences (trained and
   untrained), and acceptance length of real speculative decoding (``luce_core.speculative``,
   chain with budget block-1 and a DDTree) on ``--heldout`` other held-out prompts, how many
   outputs equalled plain greedy decoding, and how many of those prompts' batched generations
   equalled luce's one-sequence greedy decoding. One JSON line on stdout (and ``--report``).

``--time-budget S`` bounds the whole run: data stops at ``data-frac x S``, training at
``S - eval-reserve``, the held-out decoding checks the clock per prompt; the drafter file and the
report are always written. CPU is fine for a smoke run on a tiny model; real drafters want a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Callable, Sequence

import attrs

from luce_core.plugin_api import ConfigError


@attrs.frozen
class TrainConfig:
    target: str
    out: str
    steps: int = 12000  # at most; --time-budget may end training first
    block: int = 8
    layers: int = 3
    width: int = 0  # 0: the target's hidden size
    heads: int = 0  # 0: from width / head_dim
    kv_heads: int = 0  # 0: heads / 2 (at least 1)
    head_dim: int = 64
    ffn: int = 0  # 0: 3 * width
    capture: tuple[int, ...] = ()  # empty: default_capture(target layers)
    window: int = 256
    prompts: str | None = None
    n_prompts: int = 0  # training prompts used (0: all)
    variants: int = 2  # system-message variants per chat prompt (train_prompts.SYSTEMS)
    heldout: int = 16  # held-out prompts decoded speculatively for the report
    heldout_frac: float = 0.08  # fraction of prompt groups held out
    val_seqs: int = 64  # held-out sequences for validation loss / teacher-forced accuracy
    gen_tokens: int = 256
    gen_batch: int = 512
    batch: int = 1024  # anchors (blocks) per step
    anchors_per_seq: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    decay: float = 4.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    ctx: int = 0
    eval_tokens: int = 128
    tree_budget: int = 0  # 0: 2 * (block - 1)
    chat: bool = True
    save_dtype: str = "f32"
    log_every: int = 200
    eval_every: int = 500
    time_budget: float = 0.0  # seconds for the whole run; 0: unbounded
    data_frac: float = 0.35
    eval_reserve: float = 60.0
    amp: bool = True
    report: str | None = None
    progress: bool = True

    def __attrs_post_init__(self) -> None:
        for name in ("steps", "block", "layers", "window", "gen_tokens", "batch", "head_dim", "eval_tokens",
                     "gen_batch", "anchors_per_seq", "eval_every", "log_every"):
            v = getattr(self, name)
            if v <= 0:
                raise ConfigError(f"train-drafter --{name.replace('_', '-')} must be > 0, got {v}")
        if self.block < 2:
            raise ConfigError(f"train-drafter --block must be >= 2 (the pending token + drafts), got {self.block}")
        if self.heldout < 0 or self.n_prompts < 0 or self.val_seqs < 0:
            raise ConfigError("--heldout, --val-seqs and --n-prompts must be >= 0")
        if not 1 <= self.variants <= 4:
            raise ConfigError(f"--variants must be in 1..4, got {self.variants}")
        if not 0.0 <= self.heldout_frac < 1.0:
            raise ConfigError(f"--heldout-frac must be in [0, 1), got {self.heldout_frac}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.time_budget < 0 or not 0.0 < self.data_frac <= 1.0 or self.eval_reserve < 0:
            raise ConfigError("--time-budget and --eval-reserve must be >= 0 and --data-frac in (0, 1]")
        if self.save_dtype not in ("f32", "f16"):
            raise ConfigError(f"--save-dtype must be f32 or f16, got {self.save_dtype!r}")


@attrs.define
class TrainReport:
    out: str
    drafter: str
    steps: int
    train_sequences: int
    train_tokens: int  # prompt + generated tokens of the training sequences
    train_anchors: int  # generated positions a block can start at
    heldout_sequences: int  # validation sequences (held-out groups) behind heldout_accuracy_at
    first_loss: float
    final_loss: float  # training loss (moving average) at the end
    val_loss: float  # best held-out validation loss (the weights written)
    val_loss_curve: list[list[float]]  # [step, validation loss] at every evaluation
    heldout_accuracy_at: list[float]  # teacher-forced accuracy per block position, written weights
    heldout_accuracy_at_init: list[float]  # ... of the freshly initialized drafter (the baseline)
    acceptance_length_chain: float
    acceptance_length_tree: float
    acceptance_rate_at_chain: list[float]
    eval_prompts: int  # held-out prompts decoded speculatively (fewer than --heldout if time ran out)
    # held-out prompts whose speculative output (chain, tree) equalled plain greedy decoding: all
    # of them in f32; in bf16/f16 a verify over several rows can round a near-tie differently
    # from a one-row decode step, so a few may differ there
    matched_plain_greedy: list[int]
    # ... whose batched training-data generation equalled luce's one-sequence greedy decoding
    # (first eval-tokens tokens; the same rounding caveat applies)
    batched_gen_matched: int
    gen_tok_s: float  # generated tokens per second of the batched generator
    data_s: float
    train_s: float
    eval_s: float
    total_s: float
    device: str

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


# ----------------------------------------------------------------------------- arguments
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``luce train-drafter`` flags (the CLI's subparser calls this)."""
    p.add_argument("--target", required=True, help="the target GGUF the drafter serves")
    p.add_argument("--out", required=True, help="output file (.safetensors, or .gguf)")
    p.add_argument("--steps", type=int, default=12000, help="optimizer steps at most (default %(default)s)")
    p.add_argument("--block", type=int, default=8,
                   help="block size: pending token + block-1 drafts (default %(default)s)")
    p.add_argument("--layers", type=int, default=3, help="drafter layers (default %(default)s)")
    p.add_argument("--width", type=int, default=0, help="drafter hidden size (default: the target's)")
    p.add_argument("--heads", type=int, default=0, help="attention heads (default: width / head-dim)")
    p.add_argument("--kv-heads", type=int, default=0, help="KV heads (default: heads / 2)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=0, help="MLP size (default: 3 x width)")
    p.add_argument("--capture", default="", help="target capture indices, comma-separated (default: 5 spread layers)")
    p.add_argument("--window", type=int, default=256,
                   help="context positions the drafter attends (default %(default)s)")
    p.add_argument("--prompts", help="prompt file, one per line (default: the built-in set, see train_prompts)")
    p.add_argument("--n-prompts", type=int, default=0, help="use at most this many training prompts (0: all)")
    p.add_argument("--variants", type=int, default=2,
                   help="system-message variants per chat prompt, 1..4 (more data; default %(default)s)")
    p.add_argument("--heldout", type=int, default=16,
                   help="held-out prompts decoded speculatively for the report (default %(default)s)")
    p.add_argument("--heldout-frac", type=float, default=0.08,
                   help="fraction of prompt groups (topics) held out of training (default %(default)s)")
    p.add_argument("--val-seqs", type=int, default=64,
                   help="held-out sequences for validation loss and accuracy (default %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=256,
                   help="greedy tokens generated per prompt (default %(default)s)")
    p.add_argument("--gen-batch", type=int, default=512, help="sequences generated at once (default %(default)s)")
    p.add_argument("--batch", type=int, default=1024, help="anchors (blocks) per step (default %(default)s)")
    p.add_argument("--anchors-per-seq", type=int, default=16,
                   help="anchors per sequence in a step; batch / this = sequences per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--decay", type=float, default=4.0,
                   help="loss weight exp(-(i-1)/decay) per block position; 0 = uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="target compute dtype: auto | f32 | f16 | bf16")
    p.add_argument("--ctx", type=int, default=0, help="target context (default: enough for prompt + generation)")
    p.add_argument("--eval-tokens", type=int, default=128,
                   help="tokens per held-out prompt in the acceptance report (default %(default)s)")
    p.add_argument("--tree-budget", type=int, default=0, help="DDTree budget in the report (default 2 x (block-1))")
    p.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    p.add_argument("--save-dtype", default="f32", choices=("f32", "f16"))
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=500, help="steps between validation losses (default %(default)s)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the whole run (data, training, report); 0 = no limit")
    p.add_argument("--data-frac", type=float, default=0.35,
                   help="with --time-budget: share of it that data generation may use (default %(default)s)")
    p.add_argument("--eval-reserve", type=float, default=60.0,
                   help="with --time-budget: seconds kept for saving and the report (default %(default)s)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--report", help="write the JSON report here too")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    capture = tuple(int(x) for x in str(a.capture).split(",") if x.strip()) if a.capture else ()
    return TrainConfig(
        target=a.target, out=a.out, steps=a.steps, block=a.block, layers=a.layers, width=a.width, heads=a.heads,
        kv_heads=a.kv_heads, head_dim=a.head_dim, ffn=a.ffn, capture=capture, window=a.window, prompts=a.prompts,
        n_prompts=a.n_prompts, variants=a.variants, heldout=a.heldout, heldout_frac=a.heldout_frac, val_seqs=a.val_seqs,
        gen_tokens=a.gen_tokens, gen_batch=a.gen_batch, batch=a.batch, anchors_per_seq=a.anchors_per_seq, lr=a.lr,
        weight_decay=a.weight_decay, warmup=a.warmup, decay=a.decay, seed=a.seed, device=a.device, dtype=a.dtype,
        ctx=a.ctx, eval_tokens=a.eval_tokens, tree_budget=a.tree_budget, chat=not a.no_chat,
        save_dtype=a.save_dtype, log_every=a.log_every, eval_every=a.eval_every, time_budget=a.time_budget,
        data_frac=a.data_frac, eval_reserve=a.eval_reserve, amp=not a.no_amp, report=a.report,
        progress=not a.no_progress)


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point of ``luce train-drafter`` (a parsed namespace, or argv)."""
    if not isinstance(args, argparse.Namespace):
        p = argparse.ArgumentParser(prog="luce train-drafter", description=__doc__.split("\n\n")[0])
        add_arguments(p)
        args = p.parse_args(args)
    cfg = config_from_args(args)
    report = train(cfg)
    text = json.dumps(report.as_dict())
    if cfg.report:
        with open(cfg.report, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


# ----------------------------------------------------------------------------- pieces
def _log(cfg: TrainConfig, msg: str) -> None:
    if cfg.progress:
        print(f"train-drafter: {msg}", file=sys.stderr, flush=True)


class Clock:
    """The run's deadlines (all +inf without --time-budget)."""

    def __init__(self, cfg: TrainConfig):
        self.t0 = time.perf_counter()
        b = cfg.time_budget or math.inf
        self.data_end = self.t0 + cfg.data_frac * b
        self.end = self.t0 + b
        self.train_end = self.end - (cfg.eval_reserve if cfg.time_budget else 0.0)

    def now(self) -> float:
        return time.perf_counter()

    def left(self, until: float) -> float:
        return until - time.perf_counter()


def encode_prompt(tokenizer: Any, text: str, chat: bool, system: str | None = None) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", ""):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        ids = tokenizer.encode(text)
        bos = tokenizer.bos_id
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids
    return tokenizer.encode(text)


def load_prompts(cfg: TrainConfig) -> tuple[list[Any], list[Any]]:
    """(training, held-out) prompts, each list shuffled (seeded)."""
    from luce_tools.train_drafter.prompts import builtin_prompts, file_prompts, split, with_variants

    if cfg.prompts:
        try:
            prompts = file_prompts(cfg.prompts, cfg.chat)
        except OSError as e:
            raise ConfigError(f"cannot read the prompt file {cfg.prompts}: {e.strerror or e}") from None
    else:
        prompts = [p if cfg.chat else attrs.evolve(p, chat=False) for p in builtin_prompts()]
    prompts = with_variants(prompts, cfg.variants)
    train_p, held_p = split(prompts, cfg.heldout_frac, cfg.seed)
    if cfg.n_prompts:
        train_p = train_p[: cfg.n_prompts]
    if not train_p:
        raise ConfigError(f"{len(prompts)} prompts leave nothing to train on", remedy="give more prompts")
    return train_p, held_p


@attrs.frozen(eq=False)
class Sequences:
    """Prompts + greedy generations, right-padded: tokens [N, L] long, feats [N, L, F] (the
    capture rows; zero where not fed), lens [N], prompt_lens [N] (all on one device)."""

    tokens: Any
    feats: Any
    lens: Any
    prompt_lens: Any

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_anchors(self) -> Any:
        """Per sequence: anchors n in [prompt_len, len-2] (n holds a generated token, n+1 exists)."""
        return (self.lens - 1 - self.prompt_lens).clamp(min=0)

    def subset(self, idx: Any) -> "Sequences":
        return Sequences(self.tokens[idx], self.feats[idx], self.lens[idx], self.prompt_lens[idx])


def generate_data(llm: Any, prompts: Sequence[list[int]], cfg: TrainConfig, capture: tuple[int, ...],
                  should_stop: Callable[[], bool] | None = None, what: str = "training") -> tuple[Sequences, list]:
    """Batched greedy generations of ``prompts`` (in ``--gen-batch`` chunks, each sorted by
    length) until ``should_stop`` (polled between chunks and inside one); returns the sequences
    of the chunks done, in prompt order, and per prompt done its generated ids. The output
    buffers are allocated once for every prompt, so features are never copied to be joined."""
    import torch

    from luce_core.formats.dtypes import TORCH_DTYPES

    from luce_tools.train_drafter.batched_gen import BatchedGreedy

    target = llm.plan.model
    dev = target.device
    # bf16 K/V is bf16-exact in the session's f16 store too; otherwise round as the store does
    kv_dt = target.dtype if target.dtype == torch.bfloat16 else \
        TORCH_DTYPES.get(llm.plan.config.kv_k)
    gen = BatchedGreedy(target, kv_dtype=kv_dt)
    N = len(prompts)
    L = max(len(p) for p in prompts) + cfg.gen_tokens
    F = len(capture) * target.cfg.hidden
    toks = torch.zeros((N, L), dtype=torch.long, device=dev)
    feats = torch.zeros((N, L, F), dtype=target.dtype, device=dev)
    lens = torch.zeros(N, dtype=torch.long, device=dev)
    plens = torch.zeros(N, dtype=torch.long, device=dev)
    conts: list[list[int]] = []
    t0 = time.perf_counter()
    done_tokens = n_done = 0
    for c in range(0, N, cfg.gen_batch):
        if c and should_stop is not None and should_stop():
            _log(cfg, f"{what} data: time is up after {c}/{N} prompts")
            break
        chunk = list(prompts[c:c + cfg.gen_batch])
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i]))
        b = gen.generate([chunk[i] for i in order], cfg.gen_tokens, sorted(llm.tokenizer.eos_ids), capture,
                         feature_dtype=target.dtype, should_stop=should_stop)
        rows = c + torch.tensor(order, device=dev)  # row j of the batch is prompt c + order[j]
        lb = b.tokens.shape[1]
        toks[rows, :lb] = b.tokens
        feats[rows, :lb] = b.feats
        lens[rows], plens[rows] = b.lens, b.prompt_lens
        got = BatchedGreedy.continuations(b)
        back: list[list[int]] = [[] for _ in order]
        for j, i in enumerate(order):
            back[i] = got[j]
        conts += back
        del b
        n_done = c + len(chunk)
        done_tokens += sum(len(x) for x in got)
        el = time.perf_counter() - t0
        _log(cfg, f"{what} data: {n_done}/{N} prompts, {done_tokens} generated tokens, "
                  f"{done_tokens / max(el, 1e-9):.0f} tok/s")
    return Sequences(toks[:n_done], feats[:n_done], lens[:n_done], plens[:n_done]), conts


def packed_batch(data: Sequences, seqs: Any, anchors: Any, valid: Any, window: int, block: int,
                 embed: Any) -> dict[str, Any]:
    """Inputs of ``DFlashModel.denoise_blocks`` and targets for anchors [S, K] (positions; valid
    [S, K] marks real ones) of sequences ``seqs`` [S]."""
    import torch

    dev = data.tokens.device
    toks, lens = data.tokens[seqs], data.lens[seqs]
    L = toks.shape[1]
    n = anchors.clamp(max=L - 1)
    ctx_pos = torch.arange(L, device=dev)
    ctx_mask = (ctx_pos[None, None, :] < n[:, :, None]) & (ctx_pos[None, None, :] >= n[:, :, None] - window)
    ctx_mask &= valid[:, :, None]
    tidx = n[:, :, None] + torch.arange(1, block, device=dev)
    tvalid = (tidx < lens[:, None, None]) & valid[:, :, None]
    targets = toks.gather(1, tidx.clamp(max=L - 1).flatten(1)).view_as(tidx)
    first = embed[toks.gather(1, n)]
    return dict(feats=data.feats[seqs], ctx_pos=ctx_pos[None].expand(len(seqs), L), first=first, pos0=n,
                ctx_mask=ctx_mask, targets=targets, target_valid=tvalid)


def block_hidden(model: Any, b: dict[str, Any]) -> Any:
    """Drafter hidden states [S, K, block-1, target_hidden] of a packed batch."""
    kv = model.context_kv(model.context(b["feats"]), b["ctx_pos"])
    return model.denoise_blocks(b["first"], b["pos0"], kv, b["ctx_mask"])[:, :, 1:]


class Head:
    """The target's output norm + LM head as differentiable float32 ops (the head's weight is
    read out of whatever linear implementation holds it by applying it to the identity)."""

    def __init__(self, target: Any):
        import torch

        cfg = target.cfg
        with torch.no_grad():
            eye = torch.eye(cfg.hidden, device=target.device, dtype=target.dtype)
            self.w = target.lm_head(eye).float().T.contiguous().clone()  # [vocab, hidden]
            self.norm = target.out_norm.float().clone()
        self.eps = cfg.rms_eps

    def __call__(self, h: Any) -> Any:
        from luce_core.plugin_api import rms_norm

        return rms_norm(h.float(), self.norm, self.eps) @ self.w.T


def position_weights(block: int, decay: float, device: Any) -> Any:
    import torch

    i = torch.arange(block - 1, device=device, dtype=torch.float32)
    return torch.exp(-i / decay) if decay > 0 else torch.ones_like(i)


def block_loss(logits: Any, b: dict[str, Any], weights: Any) -> Any:
    import torch

    ce = torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), b["targets"].flatten(), reduction="none")
    w = b["target_valid"].float() * weights
    return (ce.view_as(w) * w).sum() / w.sum().clamp(min=1e-9)


def evaluate_tf(model: Any, head: Head, data: Sequences, dcfg: Any, embed: Any, weights: Any,
                amp: Any, rows: int = 4096) -> tuple[float, list[float]]:
    """Teacher-forced (weighted loss, accuracy per block position) over every anchor of ``data``."""
    import torch

    B = dcfg.block
    hit = torch.zeros(B - 1, device=data.tokens.device)
    cnt = torch.zeros(B - 1, device=data.tokens.device)
    loss_sum = torch.zeros((), device=data.tokens.device)
    w_sum = torch.zeros((), device=data.tokens.device)
    n_anchor = data.n_anchors.cpu()
    per = max(1, rows // max(1, int(n_anchor.max()) * B))  # sequences per forward
    was = model.training
    model.eval()
    with torch.no_grad(), amp():
        for i in range(0, data.n, per):
            seqs = torch.arange(i, min(i + per, data.n), device=data.tokens.device)
            K = max(1, int(n_anchor[i:i + per].max()))
            k = torch.arange(K, device=seqs.device)
            anchors = data.prompt_lens[seqs][:, None] + k[None, :]
            valid = k[None, :] < data.n_anchors[seqs][:, None]
            b = packed_batch(data, seqs, anchors, valid, dcfg.window, B, embed)
            logits = head(block_hidden(model, b))
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), b["targets"].flatten(),
                                                   reduction="none").view(b["targets"].shape)
            w = b["target_valid"].float() * weights
            loss_sum += (ce * w).sum()
            w_sum += w.sum()
            ok = (logits.argmax(-1) == b["targets"]) & b["target_valid"]
            hit += ok.flatten(0, 1).sum(0).float()
            cnt += b["target_valid"].flatten(0, 1).sum(0).float()
    model.train(was)
    acc = [round(float(h / c), 4) if c else 0.0 for h, c in zip(hit.cpu(), cnt.cpu())]
    return float(loss_sum / w_sum.clamp(min=1e-9)), acc


# ----------------------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> TrainReport:
    import contextlib

    import torch

    import luce
    from luce_drafters.dflash.config import DFlashConfig, default_capture
    from luce_drafters.dflash.files import save_drafter
    from luce_drafters.dflash.model import DFlashModel, describe

    clock = Clock(cfg)
    torch.manual_seed(cfg.seed)
    train_p, held_p = load_prompts(cfg)
    probe = luce.load(cfg.target, device=cfg.device, dtype=cfg.dtype, ctx=2, progress=False)
    tok = probe.tokenizer
    n_held = min(len(held_p), cfg.heldout + cfg.val_seqs)
    held_ids = [encode_prompt(tok, p.text, p.chat, p.system) for p in held_p[:n_held]]
    train_ids = [encode_prompt(tok, p.text, p.chat, p.system) for p in train_p]
    longest = max(len(e) for e in train_ids + held_ids)
    need = longest + max(cfg.gen_tokens, cfg.eval_tokens) + 2 * cfg.block + 8
    ctx = cfg.ctx or min(probe.config.ctx_train, need)
    del probe
    train_ids = [e for e in train_ids if 0 < len(e) and len(e) + cfg.gen_tokens < ctx]
    held_ids = [e for e in held_ids if 0 < len(e) and len(e) + max(cfg.gen_tokens, cfg.eval_tokens) < ctx]
    if not train_ids:
        raise ConfigError(f"no prompt leaves room for {cfg.gen_tokens} generated tokens in a context of {ctx}",
                          remedy="raise --ctx or lower --gen-tokens")
    llm = luce.load(cfg.target, device=cfg.device, dtype=cfg.dtype, ctx=ctx, progress=cfg.progress)
    target = llm.plan.model
    tcfg = target.cfg
    dev = target.device
    capture = cfg.capture or default_capture(tcfg.n_layers)
    width = cfg.width or tcfg.hidden
    heads = cfg.heads or max(1, width // cfg.head_dim)
    kv_heads = cfg.kv_heads or max(1, heads // 2)
    while heads % kv_heads:
        kv_heads -= 1
    dcfg = DFlashConfig(target_hidden=tcfg.hidden, target_vocab=tcfg.vocab, target_layers=tcfg.n_layers,
                        capture=capture, width=width, n_layers=cfg.layers, n_heads=heads, n_kv_heads=kv_heads,
                        head_dim=cfg.head_dim, ffn=cfg.ffn or 3 * width, block=cfg.block, window=cfg.window,
                        rope_base=tcfg.rope_base, rms_eps=tcfg.rms_eps, target_name=tcfg.name or cfg.target)
    _log(cfg, describe(dcfg))
    use_amp = cfg.amp and dev.type == "cuda" and torch.cuda.is_bf16_supported()

    def amp() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    # ---- data
    t_data = time.perf_counter()
    eval_ids = held_ids[: cfg.heldout]
    held, held_conts = generate_data(llm, held_ids, cfg, capture, what="held-out") if held_ids else (None, [])
    gen_t0 = time.perf_counter()
    data, _ = generate_data(llm, train_ids, cfg, capture, should_stop=lambda: clock.now() > clock.data_end)
    gen_s = time.perf_counter() - gen_t0
    gen_tokens = int((data.lens - data.prompt_lens).sum())
    n_anchors = data.n_anchors  # sequences without anchors are simply never drawn (no copy)
    n_train = int((n_anchors > 0).sum())
    if n_train == 0:
        raise ConfigError("the target generated no tokens to learn from (every generation ended at once)",
                          remedy="use other prompts, or --no-chat")
    val = None
    if held is not None:
        keep = (held.n_anchors > 0).nonzero()[:, 0]
        keep = keep[keep >= len(eval_ids)]  # the speculative-report prompts stay out of validation
        val = held.subset(keep) if len(keep) else None
    data_s = time.perf_counter() - t_data
    train_tokens = int(data.lens[n_anchors > 0].sum())
    _log(cfg, f"{n_train} training sequences, {train_tokens} tokens, {int(n_anchors.sum())} anchors "
              f"({data_s:.1f} s, {gen_tokens / max(gen_s, 1e-9):.0f} generated tok/s); "
              f"{0 if val is None else val.n} validation sequences")

    # ---- model
    model = DFlashModel(dcfg)
    model.reset_parameters(cfg.seed)
    model.to(dev).train()
    head = Head(target)
    embed = target.embed
    weights = position_weights(cfg.block, cfg.decay, dev)
    val_loss0, acc0 = evaluate_tf(model, head, val, dcfg, embed, weights, amp) if val is not None else (0.0, [])
    kw = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), **kw)
    K = min(cfg.anchors_per_seq, cfg.batch)
    S = max(1, cfg.batch // K)
    seq_w = n_anchors.float()
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    t_train = time.perf_counter()
    train_span = max(1e-9, clock.train_end - t_train)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), (time.perf_counter() - t_train) / train_span)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    first_loss = float("nan")
    ema = torch.zeros((), device=dev)
    curve: list[list[float]] = [[0, round(val_loss0, 4)]] if val is not None else []
    best = (math.inf, None)
    step = 0
    while step < cfg.steps and (step == 0 or clock.now() < clock.train_end):  # at least one step
        seqs = torch.multinomial(seq_w, S, replacement=True, generator=gen)
        u = torch.rand((S, K), device=dev, generator=gen)
        anchors = data.prompt_lens[seqs][:, None] + (u * n_anchors[seqs][:, None]).long()
        valid = torch.ones((S, K), dtype=torch.bool, device=dev)
        with amp():
            b = packed_batch(data, seqs, anchors, valid, dcfg.window, cfg.block, embed)
            loss = block_loss(head(block_hidden(model, b)), b, weights)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ld = loss.detach()
        if step == 0:
            first_loss = float(ld)
            ema = ld.clone()
        else:
            ema = 0.98 * ema + 0.02 * ld
        step += 1
        if step % cfg.eval_every == 0 and val is not None:
            vl, _ = evaluate_tf(model, head, val, dcfg, embed, weights, amp)
            curve.append([step, round(vl, 4)])
            if vl < best[0]:
                best = (vl, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if cfg.progress and (step % cfg.log_every == 0 or step == 1):
            extra = f", val {curve[-1][1]:.4f} @ {curve[-1][0]}" if curve else ""
            _log(cfg, f"step {step}/{cfg.steps} loss {float(ld):.4f} (ema {float(ema):.4f}) lr {lr_at(step):.2e}"
                      f"{extra}, {time.perf_counter() - t_train:.0f} s")
    if val is not None:
        vl, _ = evaluate_tf(model, head, val, dcfg, embed, weights, amp)
        if not curve or curve[-1][0] != step:
            curve.append([step, round(vl, 4)])
        if vl < best[0]:
            best = (vl, None)  # the last weights are the best
        if best[1] is not None:
            model.load_state_dict(best[1])
            _log(cfg, f"keeping the weights of validation loss {best[0]:.4f}")
    final_loss = float(ema)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    train_s = time.perf_counter() - t_train
    model.eval()
    save_drafter(cfg.out, dcfg, model, cfg.save_dtype)
    _log(cfg, f"wrote {cfg.out} after {step} steps ({train_s:.1f} s)")

    t_eval = time.perf_counter()
    acc: list[float] = []
    if val is not None:
        _, acc = evaluate_tf(model, head, val, dcfg, embed, weights, amp)
    del data, held
    ev = evaluate(llm, cfg, eval_ids, held_conts[: len(eval_ids)], clock)
    eval_s = time.perf_counter() - t_eval
    return TrainReport(
        out=cfg.out, drafter=describe(dcfg), steps=step, train_sequences=n_train, train_tokens=train_tokens,
        train_anchors=int(n_anchors.sum()), heldout_sequences=0 if val is None else val.n,
        first_loss=round(first_loss, 4), final_loss=round(final_loss, 4),
        val_loss=round(best[0], 4) if val is not None else 0.0, val_loss_curve=curve, heldout_accuracy_at=acc,
        heldout_accuracy_at_init=acc0, acceptance_length_chain=round(ev["al"][0], 4),
        acceptance_length_tree=round(ev["al"][1], 4), acceptance_rate_at_chain=ev["rate_at"],
        eval_prompts=ev["prompts"], matched_plain_greedy=ev["matched"], batched_gen_matched=ev["gen_matched"],
        gen_tok_s=round(gen_tokens / max(gen_s, 1e-9), 1),
        data_s=round(data_s, 2), train_s=round(train_s, 2), eval_s=round(eval_s, 2),
        total_s=round(time.perf_counter() - clock.t0, 2), device=str(dev))


def evaluate(llm: Any, cfg: TrainConfig, prompts: Sequence[list[int]], batched: Sequence[list[int]],
             clock: Clock) -> dict[str, Any]:
    """Acceptance length (chain, tree) of the saved drafter on ``prompts``; per mode how many
    speculative outputs equalled plain greedy decoding; how many batched generations did."""
    from luce_core.plugin_api import Sampler, SamplingParams
    from luce_core.plugin_api import DrafterOptions, PlainStepper, Target, generate, stepper_for
    from luce_drafters.dflash.runtime import DFlashDrafter

    res: dict[str, Any] = dict(al=[0.0, 0.0], rate_at=[], prompts=0, matched=[0, 0], gen_matched=0)
    if not prompts:
        return res
    opts = DrafterOptions(draft_model=cfg.out)
    decs = []
    for tree, budget in ((False, cfg.block - 1), (True, cfg.tree_budget or 2 * (cfg.block - 1))):
        d = DFlashDrafter()
        d.bind(Target(llm.plan.model, llm.tokenizer, llm.plan.ctx, llm.plan), opts)
        decs.append(stepper_for(llm.plan, llm.session, d, budget=budget, tree=tree, options=opts))
    stops = llm.tokenizer.eos_ids
    per_prompt = None
    for i, ids in enumerate(prompts):
        t0 = time.perf_counter()
        if per_prompt is not None and clock.left(clock.end) < 1.5 * per_prompt:
            _log(cfg, f"held-out decoding: time is up after {i}/{len(prompts)} prompts")
            break
        # every run from an empty cache: a reused prefix re-runs fewer rows, and in bf16 a few-row
        # forward need not round like the long prefill it replaces
        llm.session.truncate(0)
        ref = list(generate(PlainStepper(llm.session), ids, cfg.eval_tokens, Sampler(SamplingParams()), stops))
        if i < len(batched):  # compare the tokens both produced
            mine = [t for t in batched[i] if t not in stops]
            n = min(len(mine), len(ref))
            res["gen_matched"] += mine[:n] == ref[:n]
        for m, dec in enumerate(decs):
            llm.session.truncate(0)
            out = list(generate(dec, ids, cfg.eval_tokens, Sampler(SamplingParams()), stops))
            res["matched"][m] += out == ref
        res["prompts"] = i + 1
        per_prompt = time.perf_counter() - t0
    for m, dec in enumerate(decs):
        res["al"][m] = dec.stats.acceptance_length
        _log(cfg, f"held-out {'tree' if m else 'chain'} (budget {dec.budget}): {json.dumps(dec.stats.as_dict())}")
    res["rate_at"] = [round(r, 4) for r in decs[0].stats.acceptance_rate_at]
    return res


if __name__ == "__main__":
    sys.exit(main())

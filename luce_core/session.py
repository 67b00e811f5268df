"""One sequence over one KV store: prefix reuse, chunked prefill, decode steps, greedy chains.

The generation loop that drives a session (stop ids, max_tokens, the context limit, stats) is
``luce_core.generate``."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from luce_core.contract.errors import ContextOverflowError, DeviceMemoryError
from luce_core.model import ForwardOut, Transformer
from luce_core.contract.roles import KVStore, optional


def check_prompt_fits(n: int, ctx: int, ctx_train: int) -> None:
    """A prompt must leave room for at least one generated token."""
    if n == 0:
        raise ContextOverflowError("the prompt is empty", remedy="give a prompt with at least one token")
    if n >= ctx:
        raise ContextOverflowError(
            f"the prompt has {n} tokens but the context holds {ctx} (one more is needed to generate)",
            remedy=f"shorten the prompt, or raise the context with --ctx (the model was trained for {ctx_train})")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest shared prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (before reading a clock or a result)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DEFAULT_PREFILL_CHUNK = 512  # when neither the user nor the attention implementation sets one


class Session:
    """One sequence's state: the tokens whose K/V are in ``kv``. ``prefill_chunk`` 0 takes the
    attention implementation's preference (its ``prefill_chunk``), else DEFAULT_PREFILL_CHUNK.
    With ``graphs``, decode steps replay CUDA graphs, and so do extends of at most
    ``graph_extend`` tokens (a draft model catching up on a few accepted tokens every step; a
    prompt's one-off prefill stays eager, where capturing would cost more than it saves)."""

    def __init__(self, model: Transformer, kv: KVStore, ctx: int, prefill_chunk: int = 0,
                 graphs: bool = False, graph_extend: int = 0):
        self.model, self.kv, self.ctx = model, kv, ctx
        self.prefill_chunk = prefill_chunk or optional(model.attention, "attention", "prefill_chunk") or DEFAULT_PREFILL_CHUNK
        self.tokens: list[int] = []
        self.graphs = None
        self.graph_extend = graph_extend
        if graphs:
            from luce_core.graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, kv, ctx)

    def _tensor(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.model.device)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.kv.set_length(n)

    def prefill(self, ids: Sequence[int], progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
        """Make the KV store hold ``ids``; returns (logits after the last id, ids reused)."""
        check_prompt_fits(len(ids), self.ctx, self.model.cfg.ctx_train)
        common = common_prefix(self.tokens, ids[:-1])  # keep >= 1 id to run: its logits are needed
        self.truncate(common)
        logits = self.extend(ids, common, on_chunk=(lambda s, chunk, out: progress(len(chunk))) if progress else None)
        assert logits is not None
        return logits, common

    def extend(self, ids: Sequence[int], start: int, *, capture: Sequence[int] = (),
               on_chunk: Callable[[int, list[int], ForwardOut], None] | None = None) -> torch.Tensor | None:
        """Run ids[start:] (ids[:start] are already in the store) in prefill chunks, appending
        them; returns the logits after the last id (None when there is nothing to run).
        ``on_chunk(start, chunk, out)`` sees each chunk's forward output (e.g. captured features)."""
        logits = None
        for s in range(start, len(ids), self.prefill_chunk):
            chunk = list(ids[s:s + self.prefill_chunk])
            try:
                if self.graphs is not None and len(chunk) <= self.graph_extend:
                    out = self.graphs.run(chunk, s, capture)  # static buffers: read before the next replay
                else:
                    out = self.model.forward(self._tensor(chunk), s, self.kv, logits_rows=slice(-1, None),
                                             capture=capture)
            except torch.cuda.OutOfMemoryError:
                # the chunks before this one stay in the session; this one's activations did not fit
                raise DeviceMemoryError(
                    f"out of GPU memory in the prefill forward of a {len(chunk)}-token chunk "
                    f"(positions {s}..{s + len(chunk) - 1})",
                    remedy="lower --prefill-chunk (e.g. 512; luce.load(prefill_chunk=...)), or free GPU "
                           "memory") from None
            self.tokens += chunk
            self.kv.set_length(len(self.tokens))
            logits = out.logits[-1]
            if on_chunk:
                on_chunk(s, chunk, out)
        return logits

    def forward_rows(self, ids: Sequence[int], start: int, capture: Sequence[int] = ()) -> ForwardOut:
        """Run ids at slots start.. one token at a time, each exactly as ``step`` runs a decode
        step (a graph replay where graphs are on), without appending them; returns the stacked
        logits (and captured features). Speculative verification takes this where the backend
        does not declare multi-row forwards exact, so its rows round as plain decoding's."""
        outs = []
        for i, t in enumerate(ids):
            if self.graphs is not None:
                out = self.graphs.run([t], start + i, capture)  # static buffers: copy before the next replay
                outs.append(ForwardOut(out.logits.clone(), None if out.features is None else out.features.clone()))
            else:
                outs.append(self.model.forward(self._tensor([t]), start + i, self.kv, capture=capture))
        return ForwardOut.stack(outs)

    def forward_exact(self, ids: Sequence[int], start: int, capture: Sequence[int] = (), *,
                      static: bool = False) -> ForwardOut:
        """Run ids at slots start.. without appending them, each row rounding exactly as the
        decode step at its slot would (speculative verification): one forward where the model
        declares m-row forwards exact (a graph replay with ``static`` and graphs on), else
        ``forward_rows``."""
        if not self.model.exact_rows(len(ids)):
            return self.forward_rows(ids, start, capture)
        if static and self.graphs is not None:
            return self.graphs.run(ids, start, capture)
        return self.model.forward(self._tensor(ids), start, self.kv, capture=capture, verify=True)

    def step(self, token: int) -> torch.Tensor:
        """Append one token; returns the logits that follow it."""
        if self.graphs is not None:
            logits = self.graphs.step(token, len(self.tokens))
        else:
            logits = self.model.forward(self._tensor([token]), len(self.tokens), self.kv).logits[-1]
        self.tokens.append(token)
        self.kv.set_length(len(self.tokens))
        return logits

    def greedy(self, logits: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
        """k ids of greedy decoding (plain argmax) after ``logits``, the logits that follow the
        last token held, with one host sync in all: the ids stay on the device from one forward
        to the next (with graphs, the k - 1 forwards are one replay). The first k - 1 ids are
        run and appended. Returns (ids, logits [k, vocab] f32 each id is the argmax of)."""
        first = torch.argmax(logits, dim=-1, keepdim=True)
        start = len(self.tokens)
        if k <= 1:
            ids, rows = first, logits[None].float()
        elif self.graphs is not None:
            ids, rest = self.graphs.run_greedy(first, start, k - 1)
            rows = torch.cat([logits[None].float(), rest])
        else:
            ids, rows = [first], [logits]
            for i in range(k - 1):
                rows.append(self.model.forward(ids[-1], start + i, self.kv).logits[-1])
                ids.append(torch.argmax(rows[-1], dim=-1, keepdim=True))
            ids, rows = torch.cat(ids), torch.stack(rows).float()
        out = ids.tolist()
        self.tokens += out[:k - 1]
        self.kv.set_length(len(self.tokens))
        return out[:k], rows

"""The Python API: ``luce.load()`` and the ``LLM`` it returns."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import attrs

from luce_core.caps import probe
from luce_core.config import DEFAULT_BUDGET, RunConfig
from luce_core.detok import StreamDecoder
from luce_core.generate import PlainStepper, Stats, Stepper, generate
from luce_core.session import Session
from luce_core.contract.errors import ConfigError, LuceError
from luce_core.contract.impl import ROLES
from luce_core.contract.types import LoadedModel, Tokenizer
from luce_core.plan import Plan, build
from luce_core.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from luce_core.speculative.stepper import SpeculativeStepper

_CONFIG_FIELDS = {f.name for f in attrs.fields(RunConfig)} - {"model_path", "overrides", "model", "weight_types"}


def load(model: str | os.PathLike | None = None, *, caps: str | None = None,
         on_loaded: Callable[[LoadedModel, int], None] | None = None, **overrides: Any) -> "LLM":
    """Load a GGUF model (default: the embedded SmolLM2-135M-Instruct Q4_1) and plan its run.

    Keyword overrides are RunConfig fields (device, dtype, ctx, kv_k, kv_v, kv_rotation,
    feature_dtype, weights, cuda_graphs, prefill_chunk, progress) or role names forcing an implementation
    (linear="torch", attention=..., kv_storage=..., loader=...). ``caps`` forces capabilities
    (e.g. "cc=7.5"), like LUCE_CAPS. ``on_loaded(loaded, ctx)`` runs once the file is parsed,
    before the weights are prepared (see luce_core.plan.build): a check of the prompt against the
    tokenizer and the context that raises there fails in well under a second.
    """
    roles = {k.replace("-", "_"): str(overrides.pop(k)) for k in list(overrides) if k.replace("-", "_") in ROLES}
    unknown = sorted(set(overrides) - _CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}",
                          remedy=f"options: {', '.join(sorted(_CONFIG_FIELDS | set(ROLES)))}")
    config = RunConfig(overrides=roles, **overrides)  # a bad option fails before the default model is fetched
    if model is None:
        from luce_core.default_model import default_model_path
        model = default_model_path(progress=config.progress)
    config = attrs.evolve(config, model_path=str(model))
    return LLM(build(config, probe(caps), on_loaded))


def chat_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The prompt ids of ``messages`` under the model's chat template, ending with the assistant's turn."""
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    bos = tokenizer.bos_id
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:  # template already had BOS
        ids = ids[1:]
    return ids


class LLM:
    """A loaded model and its one session (KV cache). Calls from several threads take turns: a
    generation holds the model from its first token until its generator finishes or is closed,
    and another thread's generation waits for it. Serving many requests at once is the batching
    engine's work; or load one LLM per thread."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.tokenizer = plan.loaded.tokenizer
        self.session = Session(plan.model, plan.kv, plan.ctx, prefill_chunk=plan.config.prefill_chunk,
                               graphs=plan.graphs)
        self.last_stats = Stats()
        self.last_spec_stats = None
        self._spec, self._spec_key = None, None
        self._turn = threading.Lock()  # held by the running generation (released from any thread)
        self._holder: int | None = None  # the thread ident of that generation

    @property
    def config(self):
        return self.plan.loaded.config

    def selected(self) -> dict[str, str]:
        """Role -> name of the implementation in use."""
        return {role: impl.name for role, impl in self.plan.chosen.items()}

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def speculative(self, drafter: str, *, budget: int = DEFAULT_BUDGET, tree: bool = False,
                    draft_model: str | None = None) -> "SpeculativeStepper":
        """The speculative stepper for ``drafter`` (kept between calls, so a draft model stays loaded)."""
        from luce_core.contract.drafting import DrafterOptions
        from luce_core.speculative.stepper import check_budget
        from luce_core.speculative.wiring import make_drafter, stepper_for

        key = (drafter, budget, tree, draft_model)
        if self._spec_key != key:
            check_budget(budget)  # before a draft model's weights load
            options = DrafterOptions(draft_model=draft_model)
            self._spec = stepper_for(self.plan, self.session, make_drafter(drafter, self.plan, options),
                                     budget=budget, tree=tree, options=options)
            self._spec_key = key
        return self._spec

    def generate_ids(self, prompt: str | Sequence[int], max_tokens: int = 128, *,
                     stop_ids: Sequence[int] | None = None, drafter: str | None = None,
                     draft_budget: int = DEFAULT_BUDGET, draft_tree: bool = False, draft_model: str | None = None,
                     **sampling: Any) -> Iterator[int]:
        """Stream token ids. With ``drafter`` (or load(drafter=...) / LUCE_DRAFTER) decoding is
        speculative: drafts are verified by the target, so at temperature 0 the ids are the
        target's own greedy ids and at temperature > 0 they follow the target's distribution."""
        with self._generating():
            yield from self._generate_ids(prompt, max_tokens, stop_ids=stop_ids, drafter=drafter,
                                          draft_budget=draft_budget, draft_tree=draft_tree,
                                          draft_model=draft_model, **sampling)

    @contextlib.contextmanager
    def _generating(self) -> Iterator[None]:
        """This LLM's turn: wait for another thread's generation; refuse a second one of this
        thread's own (it would wait for itself forever)."""
        me = threading.get_ident()
        if self._holder == me:
            raise LuceError("this LLM is already generating in this thread: an earlier generator of it is unfinished",
                            remedy="finish or close() the first generator before starting another; "
                                   "for concurrent serving use one LLM per thread")
        with self._turn:
            self._holder = me
            try:
                yield
            finally:
                self._holder = None

    def _generate_ids(self, prompt: str | Sequence[int], max_tokens: int, *, stop_ids: Sequence[int] | None,
                      drafter: str | None, draft_budget: int, draft_tree: bool, draft_model: str | None,
                      **sampling: Any) -> Iterator[int]:
        from luce_core.selection import forced_name

        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stops = frozenset(self.tokenizer.eos_ids if stop_ids is None else stop_ids)
        self.last_stats = Stats()
        sampler = Sampler(SamplingParams.from_options(sampling))
        drafter = drafter or forced_name("drafter", self.plan.config)
        stepper: Stepper
        if drafter is None:
            stepper, self.last_spec_stats = PlainStepper(self.session), None
        else:
            stepper = self.speculative(drafter, budget=draft_budget, tree=draft_tree, draft_model=draft_model)
            self.last_spec_stats = stepper.reset_stats()
        with self._prefill_bar(len(ids)) as bar:
            tokens = generate(stepper, ids, max_tokens, sampler, stops, self.last_stats,
                              progress=bar.update if bar else None)
            first = next(tokens, None)  # the prefill happens here, under the progress bar
        if first is not None:
            yield first
            yield from tokens

    @contextlib.contextmanager
    def _prefill_bar(self, n: int):
        """A progress bar on stderr for prompts long enough to take a while (several chunks)."""
        if not self.plan.config.progress or n <= 2 * self.session.prefill_chunk:
            yield None
            return
        from tqdm import tqdm
        with tqdm(total=n, desc="prefill", unit="tok", leave=False, file=sys.stderr) as bar:
            yield bar

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, *, stop: Sequence[str] = (),
                 **sampling: Any) -> Iterator[str]:
        """Stream the continuation of ``prompt`` as text pieces.

        sampling: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, seed.
        Generation ends at an end-of-sequence token, at ``max_tokens``, at a ``stop`` string (not
        emitted), or when the context is full (``last_stats.finish_reason`` says which).
        """
        # closed on the way out (a stop string ends it early): the generation's turn ends with it
        with contextlib.closing(self.generate_ids(prompt, max_tokens, **sampling)) as ids:
            yield from self._pieces(ids, stop)

    def _pieces(self, ids: Iterator[int], stop: Sequence[str]) -> Iterator[str]:
        """Decode ``ids`` into text pieces, holding back what may begin a stop string."""
        dec = StreamDecoder(self.tokenizer)
        text = ""
        held = 0  # chars withheld because they may be the start of a stop string
        for tok in ids:
            text += dec.push(tok)
            if stop:
                hit = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                if hit >= 0:
                    if hit > held:
                        yield text[held:hit]
                    self.last_stats.finish_reason = "stop"
                    return
                keep = max((len(s) - 1 for s in stop), default=0)
                safe = max(held, len(text) - keep)
            else:
                safe = len(text)
            if safe > held:
                yield text[held:safe]
                held = safe
        if len(text) > held:
            yield text[held:]

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int = 256, **kw: Any) -> Iterator[str]:
        """Stream the assistant's reply to ``messages`` ([{"role": ..., "content": ...}, ...])."""
        return self.generate(chat_ids(self.tokenizer, messages), max_tokens, **kw)

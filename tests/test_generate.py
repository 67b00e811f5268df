"""The one generation loop (luce_core.generate): its stop / length / context rules and stats,
for the plain and the speculative stepper, checked against plain greedy ids taken step by step
through the session (not through the loop)."""
from __future__ import annotations

import pytest
import torch

from luce_core.contract.errors import ConfigError, ContextOverflowError
from luce_core.generate import PlainStepper, Stats, generate
from luce_core.sampling import Sampler, SamplingParams
from luce_core.speculative.wiring import make_drafter, stepper_for
import drafting_fixtures as fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CTX = 48
PROMPT = [9, 10, 11, 9, 10, 11, 9, 10]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return fixtures.load(fixtures.write_tiny(tmp_path_factory.mktemp("gen") / "t.gguf", seed=3), ctx=CTX)


def _by_hand(llm, n: int) -> list[int]:
    """n greedy ids after PROMPT: argmax of the prefill, then one session step per id."""
    s = llm.session
    s.truncate(0)
    logits, _ = s.prefill(PROMPT)
    out = [int(torch.argmax(logits))]
    while len(out) < n:
        out.append(int(torch.argmax(s.step(out[-1]))))
    s.truncate(0)
    return out


@pytest.fixture(params=["plain", "speculative"])
def stepper(request, llm):
    if request.param == "plain":
        return PlainStepper(llm.session)
    return stepper_for(llm.plan, llm.session, make_drafter("prompt-lookup", llm.plan), budget=4)


def test_length_stop_and_context_rules(llm, stepper):
    room = CTX - len(PROMPT)  # a prompt of n ids leaves room for ctx - n generated ones
    ref = _by_hand(llm, room)
    for n in (0, 1, 7, room):
        stats = Stats()
        assert list(generate(stepper, PROMPT, n, Sampler(SamplingParams()), stats=stats)) == ref[:n]
        assert (stats.finish_reason, stats.generated_tokens, stats.prompt_tokens) == ("length", n, len(PROMPT))
    stats = Stats()
    assert list(generate(stepper, PROMPT, room + 5, Sampler(SamplingParams()), stats=stats)) == ref
    assert (stats.finish_reason, stats.generated_tokens) == ("context", room)
    stop = ref[5]
    cut = ref[:ref.index(stop)]
    stats = Stats()
    assert list(generate(stepper, PROMPT, room, Sampler(SamplingParams()), frozenset({stop}), stats)) == cut
    assert (stats.finish_reason, stats.generated_tokens) == ("stop", len(cut))
    assert stats.prefill_s > 0 and stats.decode_s > 0


def test_prefix_reuse_and_bad_input(llm, stepper):
    llm.session.truncate(0)
    first, again = Stats(), Stats()
    a = list(generate(stepper, PROMPT, 6, Sampler(SamplingParams()), stats=first))
    b = list(generate(stepper, PROMPT, 6, Sampler(SamplingParams()), stats=again))
    assert a == b and first.reused_tokens == 0 and again.reused_tokens == len(PROMPT) - 1
    with pytest.raises(ConfigError, match="max_tokens"):
        list(generate(stepper, PROMPT, -1, Sampler(SamplingParams())))
    with pytest.raises(ContextOverflowError):
        list(generate(stepper, [], 4, Sampler(SamplingParams())))
    with pytest.raises(ContextOverflowError):
        list(generate(stepper, [5] * CTX, 4, Sampler(SamplingParams())))

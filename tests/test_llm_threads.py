"""One ``LLM`` used from several threads: generations take turns, so every output is the one a
single thread gets; a second generation in the thread that holds the turn is a clear error."""
from __future__ import annotations

import threading

import pytest

from drafting_fixtures import load, write_tiny
from luce_core.contract.errors import LuceError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ([5, 17, 33, 2], [100, 101, 102, 103, 104, 105], [250, 7])
SAMPLED = dict(temperature=0.9, top_k=40, seed=1234)  # a seeded sampler per call: reproducible too


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return load(write_tiny(tmp_path_factory.mktemp("threads") / "tiny.gguf"), ctx=128)


def _one(llm, prompt: list[int], sampled: bool) -> list[int]:
    return list(llm.generate_ids(list(prompt), 24, stop_ids=(), **(SAMPLED if sampled else {})))


def test_four_threads_get_the_single_threaded_outputs(llm) -> None:
    """4 threads x 3 prompts at once (greedy in two threads, seeded sampling in two)."""
    expected = {(i, sampled): _one(llm, PROMPTS[i], sampled) for i in range(3) for sampled in (False, True)}
    assert len({tuple(v) for v in expected.values()}) == 6  # every job has its own output
    got: dict[tuple[int, int], list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            start.wait()
            for k in range(3):  # the 3 prompts, each thread in its own order
                i = (t + k) % 3
                got[t, i] = _one(llm, PROMPTS[i], t % 2 == 1)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert len(got) == 12
    for (t, i), ids in got.items():
        assert ids == expected[i, t % 2 == 1], (t, i)


def test_text_generations_of_several_threads_are_not_mixed(llm) -> None:
    expected = ["".join(llm.generate(p, 16)) for p in PROMPTS]
    got: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}

    def worker(i: int) -> None:
        for _ in range(2):
            got[i].append("".join(llm.generate(PROMPTS[i], 16)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert got == {i: [expected[i]] * 2 for i in range(len(PROMPTS))}


def test_a_second_generation_in_the_same_thread_is_an_error(llm) -> None:
    first = llm.generate_ids(PROMPTS[0], 8)
    next(first)
    second = llm.generate(PROMPTS[1], 8)
    with pytest.raises(LuceError, match="already generating in this thread") as e:
        next(second)
    assert "close" in e.value.remedy and "one LLM per thread" in e.value.remedy
    first.close()  # the turn ends with the generator
    assert list(llm.generate_ids(PROMPTS[1], 8, stop_ids=())) == _one(llm, PROMPTS[1], False)[:8]


def test_a_stop_string_or_an_abandoned_generator_ends_the_turn(llm) -> None:
    text = "".join(llm.generate(PROMPTS[0], 16))
    assert len("".join(llm.generate(PROMPTS[0], 16, stop=[text[4:6]]))) < len(text)
    abandoned = llm.generate(PROMPTS[0], 16)
    next(abandoned)
    del abandoned  # collected: closed, so the turn ends
    assert "".join(llm.generate(PROMPTS[0], 16)) == text
    with pytest.raises(LuceError, match="prompt is empty"):  # an error inside a generation ends it too
        next(llm.generate([], 4))
    assert "".join(llm.generate(PROMPTS[0], 16)) == text

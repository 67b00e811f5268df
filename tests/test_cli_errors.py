"""Careless arguments to ``luce generate`` and ``luce bench``: each is one clean error (exit 2,
``luce: error: ...`` and a remedy, no traceback) raised before the model's weights are prepared.

The subprocess runs are queued at once and run two at a time; the in-process tests check that
the too-long prompt and the huge context stop before the Transformer is built.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from cli_runner import CliRun, run_luce
from drafting_fixtures import write_tiny
from luce_core import cli
from luce_core.contract.errors import ContextOverflowError, DeviceMemoryError

LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)  # ~60 tokens


def _run(args: list[str], stdin: str | None = None) -> CliRun:
    return run_luce(args, stdin=stdin)


# name -> (arguments after the model flags, text the error must contain); {tiny} and {model} are
# the synthetic and the real model
GENERATE = {
    "temp_nan": (["x", "--temp", "nan"], "--temp"),
    "temp_inf": (["x", "--temp", "inf"], "--temp"),
    "top_p_nan": (["x", "--top-p", "nan"], "--top-p"),
    "min_p_inf": (["x", "--min-p", "inf"], "--min-p"),
    "repeat_penalty_nan": (["x", "--repeat-penalty", "nan"], "--repeat-penalty"),
    "seed_2_70": (["x", "--seed", str(2**70)], "--seed"),
    "seed_negative": (["x", "--seed", "-1"], "--seed"),
    "n_negative": (["x", "-n", "-3"], "-n"),
    "system_without_chat": (["x", "--system", "be brief"], "--chat"),
    "empty_prompt": ([""], "prompt is empty"),
    "negative_ctx": (["x", "--ctx", "-5"], "ctx"),
}
BENCH = {
    "reps_0": (["--reps", "0"], "--reps"),
    "reps_negative": (["--reps", "-2"], "--reps"),
    "pp_garbage": (["--pp", "512,abc"], "--pp"),
    "missing_baseline": (["--check-baseline", "{tmp}/nowhere.json"], "cannot read the perf baseline"),
}
REAL = {  # on SmolLM2: the numbers in the messages are the real model's
    "long_prompt": ([LONG, "--ctx", "16"], "the prompt has 60 tokens but the context holds 16"),
    "long_chat": ([LONG, "--chat", "--system", "be brief", "--ctx", "40"], "but the context holds 40"),
    "huge_ctx": (["hi", "--ctx", "1000000000"], "bytes"),
}


@pytest.fixture(scope="module")
def runs(smollm2_path, tmp_path_factory) -> dict[str, Future[CliRun]]:
    tmp = tmp_path_factory.mktemp("cli_errors")
    tiny = write_tiny(tmp / "tiny.gguf")
    q = ["--no-progress"]
    jobs: dict[str, tuple[list[str], str | None]] = {}
    for name, (args, _) in GENERATE.items():
        jobs[name] = (["generate", *args, "-m", tiny, *q], None)
    jobs["empty_stdin"] = (["generate", "-m", tiny, *q], "")
    for name, (args, _) in BENCH.items():
        jobs[name] = (["bench", "-m", tiny, "--pp", "8", "--tg", "2", "--ctx", "64", *q,
                       *[a.format(tmp=tmp) for a in args]], None)
    for name, (args, _) in REAL.items():
        jobs[name] = (["generate", *args, "-m", str(smollm2_path), *q], None)
    pool = ThreadPoolExecutor(max_workers=2)
    yield {name: pool.submit(_run, args, stdin) for name, (args, stdin) in jobs.items()}
    pool.shutdown(wait=True, cancel_futures=True)


EXPECTED = {**{k: v[1] for k, v in {**GENERATE, **BENCH, **REAL}.items()}, "empty_stdin": "prompt is empty"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_careless_argument_is_one_clean_error(runs, name) -> None:
    r = runs[name].result()
    assert r.rc == 2, r
    assert "Traceback" not in r.err, r
    err = r.err.strip()
    assert err.startswith("luce: error: "), r
    assert EXPECTED[name] in err.splitlines()[0], r
    assert "\n  remedy: " in err, r
    assert r.out == "", r  # nothing generated, no benchmark JSON


def test_the_memory_error_names_the_numbers_and_the_remedy(runs) -> None:
    err = runs["huge_ctx"].result().err
    assert "a context of 1000000000 tokens needs " in err and " are free" in err, err
    assert "lower --ctx" in err and "q8_0" in err, err


@pytest.fixture
def no_weights(monkeypatch):
    """Building the Transformer (preparing the weights) fails the test."""
    from luce_core import model

    def refuse(*a, **k):
        raise AssertionError("the weights were prepared before the error")
    monkeypatch.setattr(model.Transformer, "__init__", refuse)


def test_a_long_prompt_fails_before_the_weights_are_prepared(smollm2_path, no_weights) -> None:
    for extra in ([], ["--chat"]):
        with pytest.raises(ContextOverflowError, match="the context holds 16"):
            cli.cmd_generate(cli.build_parser().parse_args(
                ["generate", LONG, "-m", str(smollm2_path), "--ctx", "16", "--no-progress", *extra]))


def test_a_huge_context_fails_before_anything_is_allocated(smollm2_path, no_weights) -> None:
    import luce

    with pytest.raises(DeviceMemoryError, match="lower --ctx"):
        luce.load(smollm2_path, device="cpu", ctx=10**9, progress=False)


def test_the_memory_check_counts_kv_and_rope(tmp_path, monkeypatch) -> None:
    """The estimate is the KV cache (bytes per token x ctx) plus the cos/sin tables: a context
    that needs one byte more than is free is refused, one that fits is not."""
    import luce
    from luce_core import plan
    from luce_core.formats.blocks import kv_bytes_per_token

    tiny = write_tiny(tmp_path / "tiny.gguf")  # 2 layers, 2 KV heads of 16
    ctx = 1000
    need = kv_bytes_per_token(2, 2, 16, "f16", "f16") * ctx + 2 * ctx * 8 * 4
    monkeypatch.setattr(plan, "free_memory", lambda device: need - 1)
    with pytest.raises(DeviceMemoryError, match=f"needs {need} bytes .* only {need - 1} bytes"):
        luce.load(tiny, device="cpu", ctx=ctx, progress=False)
    monkeypatch.setattr(plan, "free_memory", lambda device: need)
    assert luce.load(tiny, device="cpu", ctx=ctx, progress=False).plan.ctx == ctx

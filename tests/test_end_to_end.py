"""End-to-end smoke tests on the real model (SmolLM2-135M-Instruct Q4_1): the Python API with its
defaults, and the ``luce`` CLI in subprocesses (successes and user errors).

Every CLI run is queued when the module's first test asks for ``cli``; they run two at a time
while the in-process tests proceed, so the file's wall time stays near its CPU time / cores.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import luce
from cli_runner import CliRun, run_luce

FRANCE = "The capital of France is"
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)  # ~60 tokens
REQUIRED_ROLES = ("loader", "linear", "attention", "kv_storage")


def _run(args: list[str], script: bool = False, **env: str) -> CliRun:
    return run_luce(args, script=script, **env)


@pytest.fixture(scope="module")
def cli(smollm2_path, tmp_path_factory):
    """name -> Future[CliRun]; every run is queued at once, two at a time, slowest first."""
    tmp = tmp_path_factory.mktemp("cli")
    model = str(smollm2_path)
    truncated, not_gguf = tmp / "truncated.gguf", tmp / "notes.gguf"
    with open(smollm2_path, "rb") as src:  # an interrupted download: header intact, tensor data cut
        truncated.write_bytes(src.read(os.path.getsize(smollm2_path) // 2))
    not_gguf.write_text("this is a text file, not a model\n")
    q = ["--no-progress"]
    jobs: dict[str, tuple[list[str], dict]] = {
        "generate": (["generate", FRANCE, "-n", "16", *q], {}),
        "chat": (["generate", "What is the capital of France?", "--chat", "-n", "16", *q], {}),
        "ctx": (["generate", LONG_PROMPT, "-m", model, "--ctx", "16", *q], {}),
        "doctor": (["doctor", *q], {"script": True}),  # as users type it
        "attention": (["generate", FRANCE, "-m", model, "--attention", "no-such-kernel", *q], {}),
        "truncated": (["generate", FRANCE, "-m", str(truncated), *q], {}),
        "caps": (["generate", FRANCE, "-m", model, *q], {"LUCE_CAPS": "garbage"}),
        "not_gguf": (["generate", FRANCE, "-m", str(not_gguf), *q], {}),
        "missing": (["generate", FRANCE, "-m", str(tmp / "nowhere.gguf"), *q], {}),
    }
    pool = ThreadPoolExecutor(max_workers=2)
    yield {name: pool.submit(_run, args, **kw) for name, (args, kw) in jobs.items()}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def llm(cli):  # after ``cli``: the subprocesses are already loading while this one does
    # One torch thread while the CLI pool shares the cores: two-thread OpenMP pools on busy cores
    # spin-wait and run several times slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield luce.load(None, progress=False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def greedy_france(llm) -> str:
    return "".join(llm.generate(FRANCE, 16))


# ----------------------------------------------------------------------------- API
def test_default_load_greedy_knows_paris(llm, greedy_france):
    assert llm.plan.loaded.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "Paris" in greedy_france, greedy_france
    assert llm.last_stats.prompt_tokens == len(llm.encode(FRANCE))
    assert 0 < llm.last_stats.generated_tokens <= 16


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(llm):
    n = 6
    greedy = list(llm.generate_ids(FRANCE, n))
    assert greedy == list(llm.generate_ids(FRANCE, n, temperature=0.0, seed=123))  # seed ignored when greedy
    tried = []
    for seed in range(6):  # stop at the first seed whose sample leaves the greedy path
        a = list(llm.generate_ids(FRANCE, n, temperature=1.0, seed=seed))
        b = list(llm.generate_ids(FRANCE, n, temperature=1.0, seed=seed))
        assert a == b, (seed, a, b)
        tried.append(seed)
        if a != greedy:
            break
    else:
        pytest.fail(f"temperature 1.0 reproduced the greedy continuation for seeds {tried}")


def _common_prefix(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))  # independent of the engine's own helper


def test_prefix_reuse_matches_fresh_session(llm):
    first = llm.encode("The capital of France is Paris. The capital of Germany is Berlin. The capital of Spain is")
    second = llm.encode("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is")
    shared = _common_prefix(first, second)
    assert shared >= 15

    llm.session.truncate(0)
    list(llm.generate_ids(first, 6))
    reused_out = list(llm.generate_ids(second, 6))
    assert llm.last_stats.reused_tokens == shared, (llm.last_stats, shared)
    assert llm.last_stats.prefill_tps >= 0

    llm.session.truncate(0)  # a fresh session on the same store
    fresh_out = list(llm.generate_ids(second, 6))
    assert llm.last_stats.reused_tokens == 0
    assert reused_out == fresh_out
    # the same prompt again reuses all but its last token (whose logits must be recomputed)
    list(llm.generate_ids(second, 1))
    assert llm.last_stats.reused_tokens == len(second) - 1


def test_stop_string_truncates(llm, greedy_france):
    assert "." in greedy_france, greedy_france  # premise: the greedy continuation has a period
    cut = "".join(llm.generate(FRANCE, 16, stop=["."]))
    assert cut == greedy_france[:greedy_france.index(".")], (cut, greedy_france)
    assert llm.last_stats.finish_reason == "stop"


def test_api_chat_replies(llm):
    reply = "".join(llm.chat([{"role": "user", "content": "What is the capital of France?"}], 16))
    assert reply.strip(), repr(reply)
    assert "<|im_start|>" not in reply and "<|im_end|>" not in reply


# ----------------------------------------------------------------------------- CLI: success
def test_cli_generate_prints_paris(cli, greedy_france):
    r = cli["generate"].result()
    assert r.rc == 0, r
    assert r.out.startswith(FRANCE) and "Paris" in r.out, r
    # same defaults, same greedy path: the CLI prints exactly what the API generates
    assert r.out == FRANCE + greedy_france + "\n", r
    assert "Traceback" not in r.err, r


def test_cli_chat_returns_text(cli):
    r = cli["chat"].result()
    assert r.rc == 0, r
    assert r.out.strip(), r
    assert "<|im_start|>" not in r.out and "What is the capital" not in r.out, r  # reply only, no echo


def test_cli_doctor_names_selected_implementations(cli, llm):
    r = cli["doctor"].result()
    assert r.rc == 0, r
    lines = r.out.splitlines()
    selected = llm.selected()
    for role in REQUIRED_ROLES:
        assert role in lines, (role, r)
        block = []
        for line in lines[lines.index(role) + 1:]:
            if not line.startswith("  "):
                break
            block.append(line)
        chosen = [m.group(1) for m in (re.match(r"\s+\*\s+(\S+)\s.*\bselected\b", b) for b in block) if m]
        assert chosen == [selected[role]], (role, block, selected)


# ----------------------------------------------------------------------------- CLI: user errors
ERROR_CASES = {
    "truncated": "truncated",
    "not_gguf": "not a GGUF",
    "missing": "not found",
    "ctx": "context",
    "attention": "no-such-kernel",
    "caps": "garbage",
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_cli_user_error_is_one_clean_paragraph(cli, name):
    r = cli[name].result()
    assert r.rc != 0, r
    assert "Traceback" not in r.err, r
    err = r.err.strip()
    assert err.startswith("luce: error: "), r  # nothing printed before it
    assert "\n\n" not in err, r  # one paragraph (a remedy line may follow the message)
    assert ERROR_CASES[name].lower() in err.lower(), r
    assert r.out.strip() in ("", FRANCE, LONG_PROMPT), r  # no partial generation


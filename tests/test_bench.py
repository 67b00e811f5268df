"""`luce bench` emits reproducible JSON, and the baseline gate fails on each kind of regression."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from luce_tools.bench.run import check_baseline, load_baseline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from luce_tools.models.synth import write_synthetic_gguf

    path = tmp_path_factory.mktemp("bench") / "tiny.gguf"
    write_synthetic_gguf(path, arch="llama", hidden=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                         ffn=128, qtype="Q8_0", seed=1)
    return path


def test_bench_json(tiny, tmp_path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "luce_core.cli", "bench", "--model", str(tiny), "--pp", "16,32",
                           "--tg", "8", "--reps", "2", "--ctx", "256", "--kv-k", "q8_0", "--out", str(out),
                           "--drafter", "prompt-lookup", "--spec-tokens", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert json.loads(proc.stdout) == r
    assert set(r["results"]) == {"pp16", "pp32", "tg8"}
    assert all(v["tok_s"] > 0 and len(v["runs_s"]) == 2 for v in r["results"].values())
    assert r["model"] == "tiny.gguf" and r["command"].startswith("luce bench")
    # 2 layers x 2 kv heads x (q8_0 K: one 34-byte block + f16 V: 32 x 2 bytes)
    assert r["kv"]["k"] == "q8_0" and r["kv"]["bytes_per_token"] == 2 * 2 * (34 + 64)
    assert r["kv"]["allocated_bytes"] == 256 * r["kv"]["bytes_per_token"]
    assert r["selected"]["linear"] == "torch" and r["cuda_graphs"] is False and r["prefill_chunk"] == 512
    spec = r["speculative"]
    assert spec["mode"] == "chain"
    from luce_tools.bench.prompt_sets import SETS

    assert set(SETS) == {"code", "chat", "edit"} and set(SETS) <= set(spec)
    for name in SETS:  # speculative greedy decoding must reproduce plain greedy decoding
        assert spec[name]["identical_outputs"] == "4/4", spec
        assert spec[name]["plain_tok_s"] > 0 and spec[name]["acceptance_length"] >= 1.0
        # the draft / verify split and per-depth acceptance are reported per set
        s = spec[name]
        assert s["steps"] > 0 and s["verify_ms_per_step"] > 0 and s["draft_ms_per_step"] >= 0
        assert all(0.0 <= r <= 1.0 for r in s["acceptance_rate_at"])
        # the set's tokens per verify is a step-weighted mean of the prompts' own
        per = s["acceptance_length_per_prompt"]
        assert len(per) == 4 and min(per) - 1e-3 <= s["acceptance_length"] <= max(per) + 1e-3


def test_bench_tree_mode(tiny, tmp_path) -> None:
    """--draft-tree benches DDTree verification; its outputs must equal plain decoding too. The
    drafter is named by LUCE_DRAFTER here, which bench honours as it does --drafter."""
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "luce_core.cli", "bench", "--model", str(tiny), "--pp", "16",
                           "--tg", "4", "--reps", "1", "--ctx", "256", "--out", str(out),
                           "--draft-tree", "--draft-budget", "6", "--spec-tokens", "8"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LUCE_DRAFTER": "prompt-lookup"})
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(out.read_text())["speculative"]
    assert spec["mode"] == "tree" and spec["budget"] == 6
    for name in ("code", "chat", "edit"):
        assert spec[name]["identical_outputs"] == "4/4" and spec[name]["steps"] > 0


def test_bench_takes_the_drafter_without_touching_the_environment(tiny, tmp_path, monkeypatch) -> None:
    """LUCE_DRAFTER names the drafter as --drafter does, and --drafter auto (no drafter) overrides
    it; the bench reads the variable and leaves it set."""
    from luce_core import cli

    monkeypatch.setenv("LUCE_DRAFTER", "prompt-lookup")
    out = tmp_path / "e.json"
    args = ["bench", "--model", str(tiny), "--pp", "8", "--tg", "2", "--reps", "1", "--ctx", "256", "--out", str(out)]
    assert cli.main([*args, "--spec-tokens", "2"]) == 0
    assert json.loads(out.read_text())["speculative"]["drafter"] == "prompt-lookup"
    assert os.environ["LUCE_DRAFTER"] == "prompt-lookup"
    assert cli.main([*args, "--drafter", "auto"]) == 0
    assert json.loads(out.read_text())["speculative"] is None


def test_bench_kv_sweep(tiny, tmp_path) -> None:
    out = tmp_path / "kv.json"
    proc = subprocess.run([sys.executable, "-m", "luce_core.cli", "bench", "--model", str(tiny), "--tg", "4",
                           "--reps", "1", "--kv-sweep", "f16/f16,q4_0/f16,q8_0/q4_0", "--kv-depths", "16,40",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())["kv_sweep"]
    assert r["depths"] == [16, 40] and [(p["k"], p["v"]) for p in r["pairs"]] == [
        ("f16", "f16"), ("q4_0", "f16"), ("q8_0", "q4_0")]
    # per layer per kv head: f16 32 x 2 = 64 bytes, q8_0 one 34-byte block, q4_0 one 18-byte block
    assert [p["bytes_per_token"] for p in r["pairs"]] == [2 * 2 * (64 + 64), 2 * 2 * (18 + 64), 2 * 2 * (34 + 18)]
    for p in r["pairs"]:
        assert p["ctx"] == 40 + 4 + 2 and p["allocated_bytes"] == p["formula_bytes"] == p["bytes_per_token"] * p["ctx"]
        assert p["d16"]["tok_s"] > 0 and p["d40"]["kv_bytes_at_depth"] == 40 * p["bytes_per_token"]


def _result(**kw):
    r = {"device": "GPU X", "model": "m.gguf", "peak_memory_bytes": 100, "graphs_ratio": 2.0, "smoke": " Paris.",
         "results": {"tg128": {"tok_s": 1000.0}, "pp512": {"tok_s": 5000.0}}}
    r.update(kw)
    return r


def _check(result, path) -> list[str]:
    return check_baseline(result, load_baseline(str(path)))


def test_baseline_gate(tmp_path) -> None:
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"device": "GPU X", "model": "m.gguf", "tok_s": {"tg128": 1000.0, "pp512": 5000.0},
                                "max_peak_memory_bytes": 150, "smoke_contains": "Paris",
                                "thresholds": {"regression": 0.1, "graphs_ratio_min": 1.3}}))
    assert _check(_result(), base) == []
    assert _check(_result(results={"tg128": {"tok_s": 950.0}, "pp512": {"tok_s": 5000.0}}), base) == []
    slow = _check(_result(results={"tg128": {"tok_s": 850.0}, "pp512": {"tok_s": 5000.0}}), base)
    assert len(slow) == 1 and "tg128" in slow[0]
    assert "graphs" in _check(_result(graphs_ratio=1.1), base)[0]
    assert "Paris" in _check(_result(smoke=" Lyon."), base)[0]
    assert "peak memory" in _check(_result(peak_memory_bytes=200), base)[0]
    assert "not comparable" in _check(_result(device="GPU Y"), base)[0]
    assert "not measured" in _check(_result(results={"tg128": {"tok_s": 1000.0}}), base)[0]
    # a metric with its own tolerance (host-bound prefill): 30 % down passes there, not 60 %
    loose = json.loads(base.read_text())
    loose["thresholds"]["regression_by_metric"] = {"pp512": 0.5}
    base.write_text(json.dumps(loose))
    assert _check(_result(results={"tg128": {"tok_s": 1000.0}, "pp512": {"tok_s": 3500.0}}), base) == []
    low = _check(_result(results={"tg128": {"tok_s": 850.0}, "pp512": {"tok_s": 2000.0}}), base)
    assert len(low) == 2 and "pp512" in low[1] and "- 50%" in low[1] and "- 10%" in low[0]
    # one file, a baseline per device: each run is held to its own device's numbers
    multi = tmp_path / "m.json"
    other = dict(json.loads(base.read_text()), device="GPU Y", tok_s={"tg128": 2000.0})
    multi.write_text(json.dumps({"baselines": [json.loads(base.read_text()), other]}))
    assert _check(_result(), multi) == []
    assert "tg128" in _check(_result(device="GPU Y"), multi)[0]
    assert "not comparable" in _check(_result(device="GPU Z"), multi)[0]


def test_the_baseline_ships_with_the_package(tmp_path, monkeypatch) -> None:
    """--check-baseline alone reads the packaged baseline, whatever the working directory; a
    baseline file that is missing or not JSON is a clear error."""
    from luce_core.contract.errors import ConfigError
    from luce_core.plugin_api import run_flags
    from luce_tools.bench.args import add_bench_args

    monkeypatch.chdir(tmp_path)
    p = argparse.ArgumentParser()
    add_bench_args(p)
    run_flags(p)
    path = p.parse_args(["--check-baseline"]).check_baseline
    assert os.path.isabs(path) and path.endswith(os.path.join("luce_tools", "bench", "baseline.json"))
    entries = load_baseline(path).data["baselines"]
    assert {"NVIDIA H200"} <= {b["device"] for b in entries} and all(b["tok_s"] for b in entries)
    with pytest.raises(ConfigError, match="cannot read the perf baseline"):
        load_baseline(str(tmp_path / "nowhere.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a perf baseline"):
        load_baseline(str(tmp_path / "bad.json"))


FAKE_LLAMA_BENCH = """#!{python}
# a stand-in for llama.cpp's llama-bench: prints its JSON rows, 1000 tok/s per prompt test and
# 100 tok/s for the decode test, after checking the arguments luce passes
import json, sys
a = sys.argv[1:]
opt = dict(zip(a[::2], a[1::2]))
if {fail}:
    print("CUDA error: out of memory", file=sys.stderr)
    sys.exit(1)
assert opt["-o"] == "json" and opt["-ngl"] == "0" and opt["-fa"] == "1", a
rows = [dict(model_filename=opt["-m"], n_prompt=int(p), n_gen=0, avg_ts=1000.0, stddev_ts=5.0, cpu_info="fake")
        for p in opt["-p"].split(",")]
rows.append(dict(model_filename=opt["-m"], n_prompt=0, n_gen=int(opt["-n"]), avg_ts=100.0, stddev_ts=1.0,
                 cpu_info="fake"))
print(json.dumps(rows))
"""


def _fake_llama_bench(tmp_path, fail: bool = False) -> str:
    exe = tmp_path / ("llama-bench-fail" if fail else "llama-bench")
    exe.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, fail=fail))
    exe.chmod(0o755)
    return str(exe)


def test_bench_runs_llama_cpp_side_by_side(tiny, tmp_path) -> None:
    """--llama-bench runs llama-bench on the same GGUF and tests, and reports luce / llama.cpp."""
    out = tmp_path / "r.json"
    args = [sys.executable, "-m", "luce_core.cli", "bench", "--model", str(tiny), "--pp", "16", "--tg", "4",
            "--reps", "1", "--ctx", "64", "--out", str(out)]
    proc = subprocess.run(args + ["--llama-bench", _fake_llama_bench(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    anchor = r["llamacpp"]
    assert str(tiny) in anchor["command"] and "-p 16 -n 4" in anchor["command"]
    assert anchor["results"] == {"pp16": {"tok_s": 1000.0, "stddev": 5.0}, "tg4": {"tok_s": 100.0, "stddev": 1.0}}
    assert anchor["luce_over_llamacpp"] == {"pp16": round(r["results"]["pp16"]["tok_s"] / 1000.0, 3),
                                            "tg4": round(r["results"]["tg4"]["tok_s"] / 100.0, 3)}
    # a llama-bench that fails, or is missing: a clear error with its reason, not a traceback
    for exe, why in ((_fake_llama_bench(tmp_path, fail=True), "out of memory"), (str(tmp_path / "nope"), "not found")):
        out.unlink()
        proc = subprocess.run(args + ["--llama-bench", exe], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "remedy" in proc.stderr
        if why == "out of memory":  # it failed after luce's runs: they are kept
            r = json.loads(out.read_text())
            assert r["results"]["pp16"]["tok_s"] > 0 and "out of memory" in r["llamacpp"]["error"]
        else:  # missing: refused before any benchmarking
            assert not out.exists()


def test_llama_bench_parser_reads_real_output() -> None:
    """The parser against a real llama-bench JSON (H200, recorded in bench/results)."""
    from pathlib import Path

    from luce_tools.bench import llamacpp

    path = Path(__file__).parent.parent / "bench/results/llamacpp_SmolLM2-135M-Instruct.Q4_1_h200_s9.json"
    rows = json.loads(path.read_text())
    got = llamacpp.parse(path.read_text())
    assert got["device"] == "NVIDIA H200"
    assert set(got["results"]) == {"pp512", "pp4096", "tg128"}
    tg = next(r for r in rows if r["n_gen"] == 128)
    assert got["results"]["tg128"]["tok_s"] == round(tg["avg_ts"], 1)
    assert llamacpp.ratios({"tg128": {"tok_s": 2 * tg["avg_ts"]}, "pp9": {"tok_s": 1.0}}, got["results"]) == {"tg128": 2.0}

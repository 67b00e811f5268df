"""llama.cpp's ``llama-bench`` as the side-by-side anchor of ``luce bench``.

``luce bench --llama-bench PATH`` (or ``LUCE_LLAMA_BENCH=PATH``) runs llama-bench in the same
run, on the same GGUF, for the same prompt lengths and decode length, and records its tok/s
next to luce's and the luce / llama.cpp ratio per test. Build llama-bench on the GPU machine
with ``../shared/tools/llamacpp_anchor.sh build`` (or use any llama.cpp build).
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Sequence

from luce_core.plugin_api import ConfigError

REMEDY = ("build it with `bash ../shared/tools/llamacpp_anchor.sh build llama_src.tgz` (or any llama.cpp "
          "build) and pass --llama-bench PATH, or leave the option out")


def command(exe: str, model: str, pps: Sequence[int], tg: int, reps: int, gpu: bool) -> list[str]:
    """llama-bench with flash attention, every layer on the GPU (none without one), JSON out."""
    return [exe, "-m", model, "-p", ",".join(str(n) for n in pps) or "0", "-n", str(tg), "-r", str(reps),
            "-ngl", "99" if gpu else "0", "-fa", "1", "-o", "json"]


def parse(stdout: str) -> dict[str, Any]:
    """llama-bench's JSON rows -> {"pp512": {"tok_s", "stddev"}, "tg128": ...} plus its device."""
    try:
        rows = json.loads(stdout)
        results = {(f"tg{r['n_gen']}" if r["n_gen"] else f"pp{r['n_prompt']}"):
                   {"tok_s": round(float(r["avg_ts"]), 1), "stddev": round(float(r.get("stddev_ts", 0.0)), 1)}
                   for r in rows}
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"llama-bench printed no result luce can read ({e}): {stdout[:200]!r}",
                          remedy="check that PATH is llama.cpp's llama-bench") from None
    first = rows[0] if rows else {}
    return {"results": results, "device": first.get("gpu_info") or first.get("cpu_info"),
            "build": first.get("build_commit")}


def check(exe: str) -> None:
    """Fail before any benchmarking when ``exe`` cannot be run."""
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise ConfigError(f"llama-bench not found or not executable: {exe}", remedy=REMEDY)


def run(exe: str, model: str, pps: Sequence[int], tg: int, reps: int, gpu: bool,
        timeout: float = 1800) -> dict[str, Any]:
    check(exe)
    cmd = command(exe, model, pps, tg, reps, gpu)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"llama-bench ran longer than {timeout:.0f} s", remedy="bench fewer or shorter tests") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ConfigError(f"llama-bench failed (exit {proc.returncode}): {' | '.join(tail)}", remedy=REMEDY)
    return {"command": " ".join(cmd), **parse(proc.stdout)}


def ratios(luce: dict[str, Any], llama: dict[str, Any]) -> dict[str, float]:
    """luce / llama.cpp tok/s for every test both ran."""
    return {k: round(luce[k]["tok_s"] / v["tok_s"], 3) for k, v in llama.items() if k in luce and v["tok_s"] > 0}

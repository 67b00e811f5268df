"""``luce bench``: prefill (ppN), decode (tgN), time to first token, peak memory; JSON out.

Numbers are medians over --reps runs after a warm-up (prefill: at least WARMUP_S seconds of it).
The JSON records device, commit and the exact command so a result can be reproduced and compared
side by side (ratios, not lone absolute times). ``--check-baseline FILE`` turns the run into a perf gate.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from luce_core.plugin_api import ConfigError, RunConfig, forced_name, run_overrides
from luce_tools import harness
from luce_tools.bench.args import check_bench_args


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else ""
    except OSError:
        return ""


def _header(device: str) -> dict[str, Any]:
    """What every result records to be reproduced: luce version, commit, command, device, host."""
    import torch

    import luce

    return {"luce": luce.__version__, "commit": _commit(), "command": " ".join(["luce", *sys.argv[1:]]),
            "device": device, "host": platform.node(), "torch": torch.__version__}


def _device_name(caps: Any, on_gpu: bool) -> str:
    return caps.gpu_name if on_gpu else f"cpu: {caps.cpu_name}"


def _timed(llm, fn) -> float:
    from luce_core.plugin_api import sync

    sync(llm.plan.model.device)
    t0 = time.perf_counter()
    fn()
    sync(llm.plan.model.device)
    return time.perf_counter() - t0


def _prompt(llm, n: int, seed: int = 0) -> list[int]:
    import torch
    g = torch.Generator().manual_seed(seed)
    vocab = llm.config.vocab
    specials = set(llm.tokenizer.eos_ids) | ({llm.tokenizer.bos_id} if llm.tokenizer.bos_id is not None else set())
    ids = [int(i) for i in torch.randint(100, vocab, (n,), generator=g)]
    return [i if i not in specials else 100 for i in ids]


WARMUP_S = 0.5


def bench_prefill(llm, n: int, reps: int) -> dict[str, Any]:
    ids = _prompt(llm, n)
    s = llm.session
    # Warm-up: allocators, kernel caches, and GPU and CPU clocks, which a single 10 ms prefill
    # after an idle spell does not bring up (small models' prefill is host-bound): at least one
    # run and WARMUP_S seconds of prefills before the measured ones.
    t0 = time.perf_counter()
    while True:
        s.truncate(0)
        _timed(llm, lambda: s.prefill(ids))
        if time.perf_counter() - t0 >= WARMUP_S:
            break
    runs = []
    for _ in range(reps):
        s.truncate(0)
        runs.append(_timed(llm, lambda: s.prefill(ids)))
    med = statistics.median(runs)
    return {"tokens": n, "tok_s": round(n / med, 1), "ttft_ms": round(med * 1e3, 2), "runs_s": [round(x, 5) for x in runs]}


def bench_decode(llm, n: int, reps: int, depth: int = 1) -> dict[str, Any]:
    """tok/s of ``n`` greedy decode steps after a ``depth``-token prompt (the context depth the
    steps attend over)."""
    s = llm.session
    ids = [llm.tokenizer.bos_id or 1] if depth <= 1 else _prompt(llm, depth, seed=1)
    runs = []
    for r in range(reps + 1):
        s.truncate(0)
        s.prefill(ids)

        def steps() -> None:
            tok = 100
            for _ in range(n):
                s.step(tok)
        t = _timed(llm, steps)
        if r:
            runs.append(t)
    med = statistics.median(runs)
    return {"tokens": n, "tok_s": round(n / med, 1), "runs_s": [round(x, 5) for x in runs]}


def bench_speculative(llm, drafter: str, budget: int, n: int, draft_model: str | None,
                      tree: bool = False) -> dict[str, Any]:
    """Greedy decode tok/s with ``drafter`` (a chain, or a DDTree with ``tree``) vs plain decoding
    on the same prompt sets (luce_tools.bench.prompt_sets), plus acceptance length; outputs must be
    identical to count."""
    from luce_tools.bench.prompt_sets import CHAT_TEMPLATED, SETS

    out: dict[str, Any] = {"drafter": drafter, "mode": None, "budget": budget, "tokens_per_prompt": n}
    for name, prompts in SETS.items():
        texts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}])
                 if name in CHAT_TEMPLATED else p for p in prompts]
        ids = [llm.encode(t) for t in texts]
        times = {"plain": 0.0, "spec": 0.0}
        gen = {"plain": 0, "spec": 0}
        same, acc, n_accepted = 0, [], 0
        split = {"steps": 0, "draft_s": 0.0, "verify_s": 0.0, "accept_s": 0.0}
        offered: list[int] = []
        accepted: list[int] = []
        for prompt in ids:
            runs = {}
            for mode in ("plain", "spec"):
                kw = dict(drafter=drafter, draft_budget=budget, draft_model=draft_model,
                          draft_tree=tree) if mode == "spec" else {}
                # warm-up: captures every graph the timed run replays. A drafter keeps state between
                # runs (a draft model's session reuses the prompt it saw last), so the speculative
                # run warms up twice: the second starts from the state the timed run starts from.
                for _ in range(2 if mode == "spec" else 1):
                    llm.session.truncate(0)
                    list(llm.generate_ids(prompt, n, **kw))
                llm.session.truncate(0)
                toks = []
                t = _timed(llm, lambda: toks.extend(llm.generate_ids(prompt, n, **kw)))
                times[mode] += t - llm.last_stats.prefill_s
                gen[mode] += len(toks)
                runs[mode] = toks
                if mode == "spec":
                    st = llm.last_spec_stats
                    out["mode"] = st.mode  # what the decoder ran: "chain" or "tree"
                    acc.append(round(st.acceptance_length, 3))
                    n_accepted += st.accepted
                    for k in split:
                        split[k] += getattr(st, k)
                    for mine, theirs in ((offered, st.offered_at), (accepted, st.accepted_at)):
                        mine.extend([0] * (len(theirs) - len(mine)))
                        for i, v in enumerate(theirs):
                            mine[i] += v
            same += runs["plain"] == runs["spec"]
        plain, spec = gen["plain"] / times["plain"], gen["spec"] / times["spec"]
        out[name] = {"plain_tok_s": round(plain, 1), "spec_tok_s": round(spec, 1), "speedup": round(spec / plain, 3),
                     # tokens per verify over the whole set (what the speedup follows), and per prompt
                     "acceptance_length": round((n_accepted + split["steps"]) / max(1, split["steps"]), 3),
                     "acceptance_length_per_prompt": acc, "identical_outputs": f"{same}/{len(ids)}",
                     "acceptance_rate_at": [round(a / o, 4) if o else 0.0 for a, o in zip(accepted, offered)],
                     "steps": split["steps"],
                     **{f"{k[:-2]}_ms_per_step": round(1e3 * split[k] / max(1, split["steps"]), 3)
                        for k in ("draft_s", "verify_s", "accept_s")}}
    return out


def bench_kv_sweep(a: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """Decode tok/s and KV memory per KV dtype pair at each context depth, one model load per
    pair (the pair fixes the store's layout). Memory: the formula (bytes per token x capacity)
    next to what the store allocated."""
    import torch

    import luce
    from luce_core.formats.blocks import kv_bytes_per_token

    depths = [int(x) for x in str(a.kv_depths).split(",") if x.strip()]
    ctx = max(depths) + a.tg + 2
    rows = []
    for pair in str(a.kv_sweep).split(","):
        k_dt, _, v_dt = pair.strip().partition("/")
        kw = dict(overrides, kv_k=k_dt, kv_v=v_dt or k_dt, ctx=ctx)
        llm = luce.load(a.model, caps=a.caps, **kw)
        m, cfg = llm.config, llm.plan.config
        bpt = kv_bytes_per_token(m.n_layers, m.n_kv_heads, m.head_dim, cfg.kv_k, cfg.kv_v)
        row: dict[str, Any] = {"k": cfg.kv_k, "v": cfg.kv_v, "rotation": cfg.kv_rotation, "ctx": llm.plan.ctx,
                               "selected": {r: llm.selected()[r] for r in ("attention", "kv_storage")},
                               "bytes_per_token": bpt, "allocated_bytes": llm.plan.kv.nbytes,
                               "formula_bytes": bpt * llm.plan.ctx}
        for d in depths:
            r = bench_decode(llm, a.tg, a.reps, depth=d)
            row[f"d{d}"] = {"tok_s": r["tok_s"], "kv_bytes_at_depth": bpt * d}
        rows.append(row)
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"depths": depths, "tg": a.tg, "pairs": rows}


def smoke(llm) -> str:
    llm.session.truncate(0)
    return "".join(llm.generate("The capital of France is", 12))


def run(a: argparse.Namespace, overrides: dict[str, Any], drafter: str | None) -> dict[str, Any]:
    import torch

    import luce
    from luce_core.formats.blocks import kv_bytes_per_token

    exe = a.llama_bench or os.environ.get("LUCE_LLAMA_BENCH")
    if exe:
        from luce_tools.bench import llamacpp

        llamacpp.check(exe)  # before minutes of benchmarking, not after
    llm = luce.load(a.model, caps=a.caps, **overrides)
    pps = [int(x) for x in str(a.pp).split(",") if x.strip()]
    if max(pps, default=0) + 1 > llm.plan.ctx or a.tg + 2 > llm.plan.ctx:
        raise ConfigError(f"the benchmark needs a context of {max(pps + [a.tg]) + 2}, the plan has {llm.plan.ctx}",
                          remedy="pass --ctx")
    if llm.plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results: dict[str, Any] = {}
    for n in pps:
        results[f"pp{n}"] = bench_prefill(llm, n, a.reps)
    if a.tg:
        results[f"tg{a.tg}"] = bench_decode(llm, a.tg, a.reps)
    spec = (bench_speculative(llm, drafter, a.draft_budget, a.spec_tokens, a.draft_model, a.draft_tree)
            if drafter else None)
    caps = llm.plan.caps
    cfg = llm.plan.config
    peak = (torch.cuda.max_memory_allocated() if llm.plan.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    m = llm.config
    anchor = None
    if exe:  # llama.cpp in the same run, on the same GGUF: the result is a ratio
        try:
            anchor = llamacpp.run(exe, llm.plan.loaded.path, pps, a.tg, max(a.reps, 1),
                                  llm.plan.device.startswith("cuda"))
            anchor["luce_over_llamacpp"] = llamacpp.ratios(results, anchor["results"])
        except ConfigError as e:  # keep luce's own results: they are written, and the run fails after
            anchor = {"error": str(e)}
    graphed = llm.session.graphs is not None
    result = {
        **_header(_device_name(caps, llm.plan.device.startswith("cuda"))),
        "model": os.path.basename(llm.plan.loaded.path), "compute_dtype": llm.plan.dtype,
        "selected": llm.selected(), "ctx": llm.plan.ctx, "prefill_chunk": llm.session.prefill_chunk,
        "kv": {"k": cfg.kv_k, "v": cfg.kv_v, "rotation": cfg.kv_rotation,
               "bytes_per_token": kv_bytes_per_token(m.n_layers, m.n_kv_heads, m.head_dim, cfg.kv_k, cfg.kv_v),
               "allocated_bytes": llm.plan.kv.nbytes},
        "cuda_graphs": graphed, "graphs_ratio": None,
        "results": results, "speculative": spec, "peak_memory_bytes": int(peak), "smoke": smoke(llm),
        "llamacpp": anchor,
    }
    if graphed and a.tg:  # the same decode eagerly, for the graphs-on/off ratio: a second load, after the first is freed
        del llm
        gc.collect()  # the LLM's own reference cycles hold its device memory until collected
        torch.cuda.empty_cache()
        eager = luce.load(a.model, caps=a.caps, **dict(overrides, cuda_graphs=False))
        results[f"tg{a.tg}_eager"] = bench_decode(eager, a.tg, a.reps)
        result["graphs_ratio"] = round(results[f"tg{a.tg}"]["tok_s"] / results[f"tg{a.tg}_eager"]["tok_s"], 3)
    return result


@attrs.frozen
class Baseline:
    path: str
    data: dict[str, Any]


def load_baseline(path: str) -> Baseline:
    """The perf baseline in ``path``, read before the benchmark runs (a missing file is an error
    up front, not after minutes of measuring)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the perf baseline {path}: {e.strerror or e}",
                          remedy="pass an existing baseline file, or --check-baseline alone for the one "
                                 "shipped with luce") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a perf baseline: not JSON ({e})",
                          remedy="pass the JSON baseline file (see luce_tools/bench/baseline.json)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a perf baseline: its JSON is not an object",
                          remedy="pass the JSON baseline file (see luce_tools/bench/baseline.json)")
    return Baseline(path, data)


def check_baseline(result: dict[str, Any], baseline: Baseline) -> list[str]:
    """Failures of ``result`` against a baseline (empty list = pass)."""
    path, data = baseline.path, baseline.data
    # a file holds one baseline, or {"baselines": [...]}, one per device/model: the matching one applies
    entries = data.get("baselines", [data])
    base = next((b for b in entries if all(not b.get(k) or b[k] == result[k] for k in ("device", "model"))), None)
    if base is None:
        have = ", ".join(f"{b.get('device')} / {b.get('model')}" for b in entries)
        return [f"no baseline in {path} for device {result['device']!r} and model {result['model']!r} "
                f"(it has: {have}): not comparable"]
    fails = []
    thr = base.get("thresholds", data.get("thresholds", {}))
    for key, ref in base.get("tok_s", {}).items():
        got = result["results"].get(key, {}).get("tok_s")
        if got is None:
            fails.append(f"{key} was not measured (run with the baseline's --pp/--tg)")
            continue
        # a metric may have its own tolerance (a host-bound one that varies between runs)
        allowed = thr.get("regression_by_metric", {}).get(key, thr.get("regression", 0.10))
        limit = ref * (1 - allowed)
        if got < limit:
            fails.append(f"{key}: {got} tok/s is below {limit:.1f} (baseline {ref} - {allowed:.0%})")
    if "max_peak_memory_bytes" in base and result["peak_memory_bytes"] > base["max_peak_memory_bytes"]:
        fails.append(f"peak memory {result['peak_memory_bytes']} exceeds {base['max_peak_memory_bytes']}")
    ratio = result.get("graphs_ratio")
    if ratio is not None and ratio < thr.get("graphs_ratio_min", 1.3):
        fails.append(f"graphs-on/off decode ratio {ratio:.2f} is under {thr.get('graphs_ratio_min', 1.3)}")
    if base.get("smoke_contains") and base["smoke_contains"] not in result["smoke"]:
        fails.append(f"smoke prompt no longer answers {base['smoke_contains']!r}: got {result['smoke']!r}")
    return fails


def main(a: argparse.Namespace) -> int:
    """``luce bench``."""
    check_bench_args(a)
    baseline = load_baseline(a.check_baseline) if a.check_baseline else None
    overrides = run_overrides(a)
    overrides["progress"] = False
    # --drafter, else LUCE_DRAFTER (the role's own rule); the drafter runs only in bench_speculative.
    # The model loads with drafter "auto", which stands for no drafter and overrides LUCE_DRAFTER,
    # so that plain decoding, the baseline, stays plain.
    asked = overrides.pop("drafter", None)
    drafter = forced_name("drafter", RunConfig(overrides={"drafter": asked} if asked else {}))
    overrides["drafter"] = "auto"
    if a.kv_sweep:
        import torch

        from luce_core.plugin_api import probe

        sweep = bench_kv_sweep(a, overrides)
        result = {**_header(_device_name(probe(), torch.cuda.is_available())), "kv_sweep": sweep}
    else:
        result = run(a, overrides, drafter)
    harness.emit_json(result, a.out)
    anchor = result.get("llamacpp") or {}
    if "error" in anchor:
        print(f"luce bench: {anchor['error']}", file=sys.stderr)
        return 1
    if baseline is not None:
        fails = check_baseline(result, baseline)
        for f in fails:
            print(f"luce bench: FAIL {f}", file=sys.stderr)
        if fails:
            return 1
        print(f"luce bench: baseline {a.check_baseline} passed", file=sys.stderr)
    return 0

"""Where a decode step's GPU time goes, on a CUDA machine.

    luce cuda profile MODEL.gguf [--depth 512] [--steps 10] [--rows 1]   (or python -m luce_tools.cuda.profile_decode)

Prints the kernels of one eager decode step (``--rows`` R > 1: a speculative verify step of R
tokens) at context ``depth`` (time per step, launches per
step, time per launch; from the torch profiler's CUDA activity), the same table for graph
replays, and the time of one graphed step (replays back to back, CUDA events). The sum of eager
kernel times against the graphed step time shows how much of a step is launch gaps. With
programmatic dependent launch (SM 9.0+) a graphed kernel's time includes its wait for the
previous kernel, so the graphed table's times overlap and sum to more than the step.
"""
from __future__ import annotations

import argparse
import collections

import torch

from luce_tools import harness
from luce_tools.cuda.args import add_profile_arguments


def run(a: argparse.Namespace) -> None:
    """``luce cuda profile``."""
    import luce
    from torch.profiler import ProfilerActivity, profile

    llm = luce.load(a.model, ctx=max(2048, 2 * a.depth + a.steps * a.rows), progress=False)
    s = llm.session
    model, kv = s.model, s.kv
    prompt = [100 + i % 1000 for i in range(a.depth)]
    s.truncate(0)
    s.prefill(prompt)

    toks = torch.full((a.rows,), 100, device=model.device)

    def eager(n: int) -> None:
        for i in range(n):
            model.forward(toks, a.depth + i * a.rows, kv)

    def table(what: str, run) -> None:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(a.steps)
            torch.cuda.synchronize()
        per: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name][0] += 1
                per[e.name][1] += e.time_range.elapsed_us()
        total = sum(v[1] for v in per.values()) / a.steps
        print(f"{what} step at depth {a.depth}: {total:.1f} us of kernels, "
              f"{sum(v[0] for v in per.values()) / a.steps:.0f} launches")
        for name, (count, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[: a.top]:
            print(f"{us / a.steps:9.1f} us/step {count / a.steps:6.1f}/step {us / count:8.2f} us/launch  {name[:80]}")

    eager(3)
    print(llm.selected())
    table("eager", eager)
    if s.graphs is None:
        return
    s.truncate(0)
    s.prefill(prompt)
    s.graphs.run([100] * a.rows, a.depth)  # captures the graph of this window and row count
    graph, _ = next(g for key, g in s.graphs.graphs.items() if key[1] == a.rows)

    def replays(n: int) -> None:
        for _ in range(n):
            graph.replay()

    # kernels inside graph replays run back to back (no host gaps), so their times differ from eager
    table("graphed", replays)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(100):
        graph.replay()
    end.record()
    end.synchronize()
    print(f"graphed step: {begin.elapsed_time(end) * 10:.1f} us")


def main(argv: list[str] | None = None) -> int:
    return harness.main(argv, "luce_tools.cuda.profile_decode", add_profile_arguments, run)


if __name__ == "__main__":
    raise SystemExit(main())

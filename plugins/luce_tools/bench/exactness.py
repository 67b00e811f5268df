"""Does speculative decoding give the target's own greedy tokens? Count it on real prompts.

    python -m luce_tools.bench.exactness --dtype bf16 --out exact.json [--model M] [--tokens 96]

Six prompts (code, chat, repetitive text) x three drafters (prompt lookup, the target as its own
draft model, an untrained DFlash drafter) x chain and tree, each generation from an empty cache
against plain greedy decoding of the same prompt. Uses only the public ``luce`` API, so the
same command measures older luce versions too.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

PROMPTS = {
    "code-merge": 'def merge_sorted(a, b):\n    """Merge two sorted lists into a single sorted list."""\n',
    "code-class": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
    "chat-sky": "Explain why the sky is blue to a ten-year-old.",
    "chat-recipe": "Give me a simple recipe for pancakes, step by step.",
    "repeat-count": "one two three four five six seven eight nine ten one two three four five six",
    "repeat-lines": "The cat sat on the mat.\nThe dog sat on the log.\nThe cat sat on the mat.\nThe dog",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m luce_tools.bench.exactness", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="GGUF (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--budget", type=int, default=3)
    p.add_argument("--out", help="write the JSON result here too")
    a = p.parse_args(argv)
    import luce

    roles = dict(linear="torch", attention="torch", kv_storage="torch")
    llm = luce.load(a.model, device="cpu", dtype=a.dtype, ctx=512, progress=False, **roles)
    model = llm.plan.loaded.path  # the target is its own draft model
    with tempfile.TemporaryDirectory() as tmp:
        dflash = _untrained_dflash(llm, f"{tmp}/dflash.safetensors")
        drafters = {"prompt-lookup": None, "draft-model": model, "dflash": dflash}
        runs, t0 = [], time.perf_counter()
        for name, text in PROMPTS.items():
            ids = llm.encode(text)
            llm.session.truncate(0)  # every generation from an empty cache (see tests/test_spec_exact.py)
            ref = list(llm.generate_ids(ids, a.tokens))
            for drafter, path in drafters.items():
                for tree in (False, True):
                    llm.session.truncate(0)
                    out = list(llm.generate_ids(ids, a.tokens, drafter=drafter, draft_model=path,
                                                draft_tree=tree, draft_budget=a.budget))
                    first = next((i for i, (x, y) in enumerate(zip(out, ref)) if x != y),
                                 None if len(out) == len(ref) else min(len(out), len(ref)))
                    runs.append(dict(prompt=name, drafter=drafter, tree=tree, equal=out == ref, first_difference=first))
                    print(f"{name:14} {drafter:14} {'tree ' if tree else 'chain'} "
                          f"{'equal' if out == ref else f'differs at {first}'}", file=sys.stderr)
    result = dict(luce=luce.__version__, model=model.rsplit("/", 1)[-1], dtype=a.dtype, tokens=a.tokens,
                  budget=a.budget, equal=sum(r["equal"] for r in runs), runs=len(runs),
                  seconds=round(time.perf_counter() - t0, 1), detail=runs)
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(json.dumps({k: v for k, v in result.items() if k != "detail"}))
    return 0


def _untrained_dflash(llm, path: str) -> str:
    """A random DFlash drafter for the loaded target (it never predicts: every draft is rejected)."""
    try:  # this luce's layout
        from luce_drafters.dflash.model import untrained
        from luce_drafters.dflash.files import save_drafter
    except ImportError:  # luce before the dflash subpackage
        from luce_drafters.testing import random_dflash
        return random_dflash(llm.plan.model, path, block=4, window=32)
    save_drafter(path, *untrained(llm.plan.model.cfg, block=4, window=32))
    return path


if __name__ == "__main__":
    sys.exit(main())

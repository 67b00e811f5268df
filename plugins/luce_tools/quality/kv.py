"""Quality of quantized KV caches, measured against an f16 cache on the same model and text.

    luce quality kv [--model GGUF] [--tokens 2048] [--out FILE.json]   (or python -m luce_tools.quality.kv)

For each K/V dtype pair, with and without Hadamard K rotation, the model runs the same token
sequence (chunked prefill, so every query reads K/V back from the store) and every position's
next-token distribution is compared with the f16/f16 run: mean KL(f16 || quantized) and top-1
agreement. A needle-in-a-haystack check asks the model to repeat a pass code hidden mid-text.
The default text is this Python's own argparse.py source (English comments and code; offline
and fixed for a given Python version), the default model the embedded SmolLM2.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any, Sequence

import torch

from luce_core.plugin_api import ConfigError, KVSpec
from luce_tools import harness
from luce_tools.quality.args import add_kv_arguments

CONFIGS: tuple[tuple[str, str, bool], ...] = (
    ("q8_0", "q8_0", False), ("q8_0", "q8_0", True),
    ("q4_0", "q4_0", False), ("q4_0", "q4_0", True),
    ("q4_0", "f16", False), ("q4_0", "f16", True),
)
NEEDLE = " The secret pass code is 73914. "
QUESTION = "\n\nQuestion: what is the secret pass code?\nAnswer: The secret pass code is"


def reference_text() -> str:
    import argparse as ap_module

    return inspect.getsource(ap_module)

REFERENCE_NAME = f"Python {sys.version.split()[0]} argparse.py source"


def reference_ids(llm: Any, n: int) -> list[int]:
    """The first n token ids of reference_text()."""
    ids = llm.encode(reference_text())
    if len(ids) < n:
        raise ConfigError(f"the reference text has only {len(ids)} tokens", remedy=f"pass --tokens {len(ids)} or fewer")
    return ids[:n]


def kv_store(llm: Any, k: str, v: str, rotation: bool, capacity: int) -> Any:
    """A KV store of ``llm``'s own kv_storage implementation, with the given dtypes and capacity."""
    impl = llm.plan.chosen["kv_storage"]
    cfg = llm.config
    spec = KVSpec(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, capacity=capacity,
                  k_dtype=k, v_dtype=v, rotation=rotation, device=llm.plan.device, compute_dtype=llm.plan.dtype)
    return impl.create(llm.plan.caps, llm.plan.config).allocate(spec)


@torch.inference_mode()
def all_logprobs(model: Any, ids: Sequence[int], kv: Any, chunk: int = 256) -> torch.Tensor:
    """Log-probabilities [len(ids), vocab] of every position under ``model`` (a Transformer),
    prefilling in chunks into ``kv``."""
    out = []
    for s in range(0, len(ids), chunk):
        piece = torch.tensor(ids[s:s + chunk], device=model.device)
        out.append(torch.log_softmax(model.forward(piece, s, kv).logits.float(), -1).cpu())
        kv.set_length(s + len(piece))
    return torch.cat(out)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    kl = (ref.exp() * (ref - got)).sum(-1)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean())}


def needle(llm: Any, filler_ids: list[int], k: str, v: str, rotation: bool) -> dict[str, Any]:
    from luce_core.plugin_api import PlainStepper, Sampler, SamplingParams, Session, generate

    tok = llm.tokenizer
    half = len(filler_ids) // 2
    ids = filler_ids[:half] + tok.encode(NEEDLE, add_bos=False) + filler_ids[half:] + tok.encode(QUESTION, add_bos=False)
    kv = kv_store(llm, k, v, rotation, len(ids) + 16)
    s = Session(llm.plan.model, kv, len(ids) + 16)
    answer = tok.decode(list(generate(PlainStepper(s), ids, 8, Sampler(SamplingParams()))))
    return {"context_tokens": len(ids), "answer": answer, "found": "73914" in answer}


def measure(llm: Any, ids: list[int], configs: Sequence[tuple[str, str, bool]] = CONFIGS,
            needle_filler: list[int] | None = None) -> dict[str, Any]:
    ref = all_logprobs(llm.plan.model, ids, kv_store(llm, "f16", "f16", False, len(ids)))
    rows = []
    for k, v, rot in configs:
        got = all_logprobs(llm.plan.model, ids, kv_store(llm, k, v, rot, len(ids)))
        rows.append({"k": k, "v": v, "rotation": rot, **compare(ref, got)})
    out: dict[str, Any] = {"tokens": len(ids), "reference": "f16/f16", "configs": rows}
    if needle_filler is not None:
        out["needle"] = [{"k": k, "v": v, "rotation": r, **needle(llm, needle_filler, k, v, r)}
                         for k, v, r in (("f16", "f16", False), ("q8_0", "q8_0", True), ("q4_0", "f16", True),
                                        ("q4_0", "q4_0", True), ("q4_0", "q4_0", False))]
    return out


def run(a: argparse.Namespace) -> None:
    """``luce quality kv``."""
    import luce

    llm = luce.load(a.model, device=a.device, ctx=a.tokens + 64, progress=False)
    ids = reference_ids(llm, a.tokens)
    harness.emit_json({"model": llm.plan.loaded.path, "text": REFERENCE_NAME,
                       **measure(llm, ids, needle_filler=None if a.no_needle else ids[1: a.tokens - 64])}, a.out)


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(argv, "luce_tools.quality.kv", add_kv_arguments, run)


if __name__ == "__main__":
    raise SystemExit(main())

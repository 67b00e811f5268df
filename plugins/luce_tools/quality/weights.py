"""Quality of NVFP4-repacked weights (``--weights nvfp4``), measured against the source weights.

    luce quality weights [--model GGUF] [--tokens 1024] [--out FILE.json]   (or python -m luce_tools.quality.weights)

The model runs the same token sequence with its stored weights and with its matmul weights
repacked to NVFP4 (luce_core.formats.repack), on the reference torch linear (so only the weights differ,
not the kernels) and an f32 KV cache; every position's next-token distribution is compared:
mean KL(source || nvfp4), top-1 agreement, and each run's mean negative log-likelihood of the
text. Measured: NVFP4 for every matmul with the LM head (what ``--weights nvfp4`` runs), NVFP4
for the body alone (head kept in its source type), and for scale the same repack to Q4_0 (another
4-bit format) and Q8_0 (the cost of re-quantizing at all). The text is luce_tools.quality.kv's (this
Python's argparse.py source), the default model the embedded SmolLM2.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import torch

from luce_core.plugin_api import LoadedModel
from luce_tools import harness
from luce_tools.quality.args import add_weights_arguments
from luce_tools.quality.kv import REFERENCE_NAME, all_logprobs, compare, kv_store, reference_ids

# (name, target type, LM head repacked too)
VARIANTS: tuple[tuple[str, str, bool], ...] = (("nvfp4", "NVFP4", True), ("nvfp4-body", "NVFP4", False),
                                               ("q4_0", "Q4_0", True), ("q8_0", "Q8_0", True))


def nll(lp: torch.Tensor, ids: Sequence[int]) -> float:
    """Mean negative log-likelihood of the text's own next tokens."""
    nxt = torch.tensor(ids[1:])
    return float(-lp[:-1].gather(1, nxt[:, None]).mean())


def matmul_bytes(loaded: LoadedModel) -> int:
    """Bytes of what the linear multiplies by: the layers' matrices and the LM head."""
    from luce_core.formats.repack import matmul_groups

    t = loaded.tensors
    body = sum(t[n].nbytes for g in matmul_groups(loaded, lm_head=False) for n in g)
    return body + t.get("output.weight", t["token_embd.weight"]).nbytes


def _model(llm: Any, loaded: LoadedModel) -> Any:
    """A Transformer over ``loaded`` with the plan's own linear and attention choices."""
    from luce_core.plugin_api import Transformer

    plan = llm.plan
    linear = plan.chosen["linear"].create(plan.caps, plan.config)
    return Transformer(loaded, linear, plan.model.attention, plan.model.device, plan.model.dtype, max_positions=plan.ctx)


def measure(llm: Any, ids: list[int], variants: Sequence[tuple[str, str, bool]] = VARIANTS) -> dict[str, Any]:
    from luce_core.formats.repack import repack

    src = llm.plan.loaded
    ref = all_logprobs(llm.plan.model, ids, kv_store(llm, "f32", "f32", False, len(ids)))
    rows = []
    for name, qtype, head in variants:
        t0 = time.perf_counter()
        repacked = repack(src, qtype, lm_head=head)
        seconds = time.perf_counter() - t0
        got = all_logprobs(_model(llm, repacked), ids, kv_store(llm, "f32", "f32", False, len(ids)))
        rows.append({"weights": name, "lm_head": qtype if head else "source", **compare(ref, got),
                     "nll": round(nll(got, ids), 4), "matmul_bytes": matmul_bytes(repacked),
                     "repack_seconds": round(seconds, 2), "repacked_from": repacked.metadata["repacked"]["from"]})
    return {"tokens": len(ids), "reference": "source weights", "source_types": dict(src.metadata.get("tensor_types", {})),
            "reference_nll": round(nll(ref, ids), 4), "reference_matmul_bytes": matmul_bytes(src), "configs": rows}


def run(a: argparse.Namespace) -> None:
    """``luce quality weights``."""
    import warnings

    import luce

    llm = luce.load(a.model, device=a.device, dtype="f32", weights="native", linear="torch",
                    ctx=a.tokens + 16, progress=False)
    ids = reference_ids(llm, a.tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = {"model": llm.plan.loaded.path, "text": REFERENCE_NAME,
                  "device": llm.plan.device, "selected": llm.selected(), **measure(llm, ids)}
    result["notes"] = sorted({str(w.message) for w in caught if str(w.message).startswith("luce:")})
    harness.emit_json(result, a.out)


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(argv, "luce_tools.quality.weights", add_weights_arguments, run)


if __name__ == "__main__":
    raise SystemExit(main())

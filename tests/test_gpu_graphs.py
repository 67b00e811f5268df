"""GPU: one-graph decode gives the same greedy tokens as eager decode (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

import luce

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kv", [("f16", "f16"), ("q8_0", "q4_0")])
def test_graph_decode_matches_eager(smollm2_path, kv) -> None:
    prompt = "The capital of France is"
    graphs = luce.load(smollm2_path, device="cuda", ctx=1024, kv_k=kv[0], kv_v=kv[1], progress=False)
    assert graphs.session.graphs is not None
    eager = luce.load(smollm2_path, device="cuda", ctx=1024, kv_k=kv[0], kv_v=kv[1], cuda_graphs=False,
                      progress=False)
    a = list(graphs.generate_ids(prompt, 300))  # crosses the 256-slot window boundary
    b = list(eager.generate_ids(prompt, 300))
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert n >= min(len(a), len(b), 32), f"first divergence at token {n}"

"""The KV-quality measurement: the reference pair scores zero, coarser caches score worse."""
from __future__ import annotations

import torch

import luce
from luce_tools.quality.kv import compare, measure


def test_compare_is_kl_and_agreement() -> None:
    ref = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), -1)
    assert compare(ref, ref) == {"mean_kl": 0.0, "max_kl": 0.0, "top1_agreement": 1.0}
    flipped = torch.log_softmax(torch.tensor([[0.0, 2.0, -1.0], [0.0, 1.0, 0.0]]), -1)
    r = compare(ref, flipped)
    assert r["top1_agreement"] == 0.5 and r["max_kl"] > 0.5 and r["mean_kl"] == r["max_kl"] / 2


def test_measure_orders_dtypes(tmp_path, one_torch_thread) -> None:
    from luce_tools.models.synth import write_synthetic_gguf

    path = tmp_path / "q3.gguf"
    write_synthetic_gguf(path, arch="qwen3", hidden=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                         ffn=256, vocab=512, seed=5, outlier_channels=4)
    llm = luce.load(path, device="cpu", ctx=300, progress=False)
    ids = [int(i) for i in torch.randint(0, 512, (256,), generator=torch.Generator().manual_seed(0))]
    r = measure(llm, ids, configs=(("f16", "f16", False), ("q8_0", "q8_0", False), ("q4_0", "q4_0", False),
                                   ("q4_0", "q4_0", True)))
    kl = {(c["k"], c["rotation"]): c["mean_kl"] for c in r["configs"]}
    assert kl[("f16", False)] == 0.0
    assert 0 < kl[("q8_0", False)] < kl[("q4_0", False)]
    # outlier K channels: the rotation spreads them, so q4_0 K loses less
    assert kl[("q4_0", True)] < kl[("q4_0", False)]
    print(f"\nsynthetic qwen3 with 4 outlier K channels, 256 tokens: {r['configs']}")

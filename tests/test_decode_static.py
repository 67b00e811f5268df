"""The static (graph-capturable) decode step computes what the eager step computes."""
from __future__ import annotations

import pytest
import torch

import luce
from luce_core.graphs import windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from luce_tools.models.synth import write_synthetic_gguf

    path = tmp_path_factory.mktemp("static") / "tiny.gguf"
    write_synthetic_gguf(path, arch="qwen3", hidden=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                         ffn=256, qtype="Q8_0", seed=3)
    return path


@pytest.mark.parametrize("kv", [("f16", "f16"), ("q4_0", "q8_0")])
def test_static_step_equals_eager_step(tiny, kv) -> None:
    llm = luce.load(tiny, device="cpu", ctx=64, kv_k=kv[0], kv_v=kv[1], progress=False)
    model, s = llm.plan.model, llm.session
    prompt = [5, 9, 17, 33, 2, 8]
    s.prefill(prompt)
    eager = s.step(40)
    s.truncate(len(prompt))
    window = 16
    pos = torch.tensor([len(prompt)])
    static = model.decode_static(torch.tensor([40]), pos, s.kv, window).logits[0]
    torch.testing.assert_close(static, eager, rtol=1e-4, atol=1e-4)
    # garbage beyond the current position must be masked out, not attended to
    s.kv.write(0, 10, torch.randn(4, 2, 32) * 100, torch.randn(4, 2, 32) * 100)
    again = model.decode_static(torch.tensor([40]), pos, s.kv, window).logits[0]
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-4)


def test_static_chain_of_tokens_equals_forward(tiny) -> None:
    """T > 1 (a speculative chain verify): every row equals the eager forward's row."""
    llm = luce.load(tiny, device="cpu", ctx=64, progress=False)
    model, s = llm.plan.model, llm.session
    prompt = [5, 9, 17, 33, 2, 8]
    s.prefill(prompt)
    chain = torch.tensor([40, 41, 7, 3])
    n = len(prompt)
    eager = model.forward(chain, n, s.kv, capture=(0, 2))
    static = model.decode_static(chain, torch.arange(n, n + 4), s.kv, 32, capture=(0, 2))
    torch.testing.assert_close(static.logits, eager.logits, rtol=1e-4, atol=1e-4)
    # a DFlash verify also captures target features: the same ones as the eager forward's
    assert static.features is not None and static.features.shape == eager.features.shape
    torch.testing.assert_close(static.features, eager.features, rtol=1e-4, atol=1e-4)


def test_windows_cover_context() -> None:
    assert windows(100) == [100]
    assert windows(4096) == [256, 512, 1024, 2048, 4096]
    assert windows(3000)[-1] == 3000 and all(a < b for a, b in zip(windows(3000), windows(3000)[1:]))

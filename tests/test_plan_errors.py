"""Planning turns device failures into errors that say what to do."""
from __future__ import annotations

import pytest
import torch

import luce
from luce_core.contract import CONTRACT_VERSION
from luce_core.contract.errors import DeviceMemoryError, KernelError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from luce_tools.models.synth import write_synthetic_gguf

    path = tmp_path_factory.mktemp("plan") / "tiny.gguf"
    write_synthetic_gguf(path, arch="llama", hidden=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32,
                         ffn=64, vocab=300, return_weights=False)
    return path


def test_out_of_memory_while_loading_weights(tiny, monkeypatch) -> None:
    from luce_torch import linear

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(linear.TorchLinear, "prepare", oom)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123 << 20, 80 << 30))
    with pytest.raises(DeviceMemoryError, match="out of GPU memory while loading the weights") as e:
        luce.load(tiny, device="cpu", progress=False)
    assert "--device cpu" in e.value.remedy


def test_out_of_memory_for_the_kv_cache(tiny, monkeypatch) -> None:
    from luce_torch import kv

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(kv.TorchKVStorage, "allocate", oom)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 << 30))
    with pytest.raises(DeviceMemoryError, match="KV cache needs") as e:
        luce.load(tiny, device="cpu", ctx=1000, progress=False)
    assert "--ctx" in e.value.remedy


def test_out_of_memory_in_a_prefill_chunk_keeps_the_earlier_chunks(tiny, monkeypatch) -> None:
    """A prefill chunk whose activations do not fit is an error naming --prefill-chunk; the chunks
    already run stay in the session, which goes on working."""
    llm = luce.load(tiny, device="cpu", dtype="f32", ctx=64, prefill_chunk=8, progress=False)
    model = llm.session.model
    real = model.forward

    def forward(tokens, start, kv, **kw):
        if start >= 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(tokens, start, kv, **kw)
    monkeypatch.setattr(model, "forward", forward)
    with pytest.raises(DeviceMemoryError, match="8-token chunk") as e:
        llm.session.prefill(list(range(5, 25)))
    assert "--prefill-chunk" in e.value.remedy
    assert llm.session.tokens == list(range(5, 13))
    monkeypatch.setattr(model, "forward", real)
    logits, reused = llm.session.prefill(list(range(5, 25)))
    assert reused == 8 and torch.isfinite(logits).all()


def test_kernel_failure_falls_back_unless_forced(tiny, monkeypatch) -> None:
    """An implementation failing at first use (KernelError) gives way to the next candidate with
    a warning; the same failure of a forced implementation is an error."""
    from luce_core import plugin_host
    from luce_core.contract.impl import Impl

    class Broken:
        def __init__(self, caps, config):
            raise KernelError("kernel does not compile here")

    class Plugin:
        @staticmethod
        @luce.hookimpl
        def provide_attention():
            return [Impl("attention", "broken", f"{__name__}:Broken", priority=50, contract=CONTRACT_VERSION)]

    globals()["Broken"] = Broken
    plugin_host.host().register(Plugin, "broken-test")
    with pytest.warns(UserWarning, match="'broken' failed"):
        llm = luce.load(tiny, device="cpu", progress=False)
    assert llm.selected()["attention"] == "torch"
    with pytest.raises(luce.LuceError, match="forced"):
        luce.load(tiny, device="cpu", attention="broken", progress=False)


def test_layer_ops_come_from_the_linear_role(tiny) -> None:
    """The model runs the LayerOps its linear implementation offers (Linear.layer_ops); an
    attention object carrying one is not asked (the fusions live in the linear role)."""
    from luce_core import plugin_host
    from luce_core.contract.impl import Impl
    from luce_core.layer_ops import TORCH_LAYER_OPS, TorchLayerOps
    from luce_torch.attention import TorchAttention
    from luce_torch.linear import TorchLinear

    class Counting(TorchLayerOps):
        calls = 0

        def linear_residual(self, proj, x, residual):
            Counting.calls += 1
            return super().linear_residual(proj, x, residual)

    class FusingLinear(TorchLinear):
        def __init__(self, caps, config):
            super().__init__(caps, config)
            self.layer_ops = Counting()

    class AttentionWithOps(TorchAttention):
        def __init__(self, caps, config):
            super().__init__()
            self.layer_ops = Counting()  # not the attention role's to offer: ignored

    class Plugin:
        @staticmethod
        @luce.hookimpl
        def provide_linear():
            return [Impl("linear", "fusing", f"{__name__}:FusingLinear", priority=50, contract=CONTRACT_VERSION)]

        @staticmethod
        @luce.hookimpl
        def provide_attention():
            return [Impl("attention", "with-ops", f"{__name__}:AttentionWithOps", priority=50,
                         contract=CONTRACT_VERSION)]

    globals().update(FusingLinear=FusingLinear, AttentionWithOps=AttentionWithOps)
    plugin_host.host().register(Plugin, "layer-ops-test")
    llm = luce.load(tiny, device="cpu", progress=False)
    assert llm.selected()["linear"] == "fusing" and llm.selected()["attention"] == "with-ops"
    ops = llm.plan.model.ops
    assert isinstance(ops, Counting) and ops is not llm.plan.model.attention.layer_ops
    list(llm.generate_ids([1, 2, 3], 2))
    assert Counting.calls > 0
    plain = luce.load(tiny, device="cpu", linear="torch", progress=False)
    assert plain.plan.model.ops is TORCH_LAYER_OPS  # attention "with-ops" still selected, its ops unused

"""The torch reference ``linear`` role: y = x @ W.T with W dequantized once per device/dtype."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import luce_torch.linear as linear_mod
from luce_core import plugin_host
from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.contract.errors import ConfigError
from luce_core.contract.types import QTensor
from luce_torch.linear import TorchLinear
from luce_core.formats.quantize import quantize, quantize_nvfp4


def oracle(w: QTensor) -> np.ndarray:
    """gguf's dequantization of w, times its per-tensor scale, as float64 for the matmul."""
    ref = gguf.quants.dequantize(np.asarray(w.data), gguf.GGMLQuantizationType[w.qtype])
    return (ref.reshape(w.shape) * np.float32(w.scale)).astype(np.float64)


def make(qtype: str, out: int = 48, inp: int = 256, seed: int = 0, name: str = "blk.0.w") -> QTensor:
    x = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    if qtype == "NVFP4":
        raw, ts = quantize_nvfp4(x)
        return QTensor(name, qtype, (out, inp), raw, scale=ts)
    return QTensor(name, qtype, (out, inp), quantize(x, qtype))


def test_descriptor_creates_this_class() -> None:
    impl = next(i for i in plugin_host.host().impls("linear") if i.name == "torch")
    assert impl.reasons(Caps(), RunConfig(weight_types={"Q4_1", "F32"})) == []
    assert impl.reasons(Caps(), RunConfig(weight_types={"IQ2_XS"}))  # a type it cannot read
    assert isinstance(impl.create(Caps(), RunConfig()), TorchLinear)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "NVFP4"])
def test_matches_oracle_matmul(qtype: str) -> None:
    w = make(qtype)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    f = TorchLinear().prepare(w, "cpu", torch.float32)
    y = f(x)
    assert y.dtype == torch.float32 and y.shape == (5, 48)
    np.testing.assert_allclose(y.numpy(), x.double().numpy() @ oracle(w).T, rtol=1e-5, atol=1e-4)


def test_low_precision_dtype_and_input_cast() -> None:
    w = make("Q4_1")
    x = torch.randn(3, 7, 256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lin = TorchLinear()
    y = lin.prepare(w, "cpu", torch.bfloat16)(x)  # float64 input is cast to the compute dtype
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 48)
    ref = x.numpy() @ oracle(w).T
    err = np.abs(y.float().numpy() - ref).max() / np.abs(ref).max()
    assert err < 0.02  # bf16 weights and inputs: ~3 significant digits
    w_bf16 = lin.dequantize(w, "cpu", torch.bfloat16)
    assert w_bf16.dtype == torch.bfloat16
    assert torch.equal(w_bf16, torch.from_numpy(oracle(w)).to(torch.float32).to(torch.bfloat16))


def test_dequantizes_once_per_weight_device_dtype(monkeypatch) -> None:
    calls: list[str] = []
    real = linear_mod.dequantize_qtensor

    def counting(w, device=None):
        calls.append(w.name)
        return real(w, device)

    monkeypatch.setattr(linear_mod, "dequantize_qtensor", counting)
    lin = TorchLinear()
    w = make("Q8_0", name="token_embd.weight")
    f1 = lin.prepare(w, "cpu", torch.float32)
    f2 = lin.prepare(w, torch.device("cpu"), torch.float32)
    emb = lin.dequantize(w, "cpu", torch.float32)  # tied embedding: the same copy
    assert calls == ["token_embd.weight"]
    assert emb is lin.dequantize(w, "cpu", torch.float32)
    x = torch.randn(2, 256)
    assert torch.equal(f1(x), f2(x))
    lin.prepare(w, "cpu", torch.float16)  # another dtype is another copy
    assert len(calls) == 2
    # another tensor with the same name (another model) is not served a stale copy
    other = make("Q8_0", seed=9, name="token_embd.weight")
    np.testing.assert_array_equal(lin.dequantize(other, "cpu", torch.float32).numpy(), oracle(other))
    assert len(calls) == 3 and lin.nbytes > 0
    lin.clear()
    assert lin.nbytes == 0


def test_vectors_dequantize_but_do_not_prepare() -> None:
    norm = QTensor("blk.0.attn_norm.weight", "F32", (64,), np.arange(64, dtype=np.float32).view(np.uint8)[None])
    lin = TorchLinear()
    v = lin.dequantize(norm, "cpu", torch.float32)
    assert v.shape == (64,) and torch.equal(v, torch.arange(64, dtype=torch.float32))
    with pytest.raises(ConfigError) as e:
        lin.prepare(norm, "cpu", torch.float32)
    assert e.value.remedy


def test_f32_weight_is_an_owned_copy(tmp_path) -> None:
    """F32 dequantizes to a view of the read-only map; the cached weight must not be one."""
    np.arange(64 * 32, dtype=np.float32).tofile(tmp_path / "w.bin")
    mm = np.memmap(tmp_path / "w.bin", dtype=np.uint8, mode="r", shape=(64, 128))
    w = QTensor("output.weight", "F32", (64, 32), mm)
    t = TorchLinear().dequantize(w, "cpu", torch.float32)
    assert t.data_ptr() != mm.ctypes.data
    t.mul_(2)  # would fault on the read-only map
    assert torch.equal(t, 2 * torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32))


def test_smollm2_weights(smollm2_path) -> None:
    """Real tensors as the loader hands them over (memmap views): the Q4_1 q projection and the
    tied Q8_0 embedding / output head."""
    from luce_gguf.reader import open_gguf

    f = open_gguf(smollm2_path)
    lin = TorchLinear()
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(3))
    for name, qtype in (("blk.0.attn_q.weight", "Q4_1"), ("token_embd.weight", "Q8_0")):
        w = f.qtensor(name)
        assert w.qtype == qtype
        y = lin.prepare(w, "cpu", torch.float32)(x)
        assert y.shape == (4, w.shape[0])
        np.testing.assert_allclose(y.numpy(), x.double().numpy() @ oracle(w).T, rtol=1e-4, atol=1e-4)
    assert y.shape == (4, 49152)



def test_layer_ops_linear_glu():
    """The reference ``LayerOps.linear``: proj(x), or with glu silu(gate) * up of its halves."""
    from luce_core.layer_ops import TORCH_LAYER_OPS

    w = torch.randn(48, 64, dtype=torch.float64)
    proj = lambda h: h @ w.T  # noqa: E731
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(TORCH_LAYER_OPS.linear(proj, x), proj(x))
    y = proj(x)
    torch.testing.assert_close(TORCH_LAYER_OPS.linear(proj, x, glu=True),
                               torch.nn.functional.silu(y[:, :24]) * y[:, 24:])


def test_layer_ops_norm_linear_and_residual():
    """The reference ``norm_linear`` (proj of the RMS-normalized input, glu too) and
    ``linear_residual`` (the residual plus proj, in the residual's dtype), against formulas."""
    from luce_core.layer_ops import TORCH_LAYER_OPS

    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 64, dtype=torch.float64, generator=g)
    proj = lambda h: h @ w.T  # noqa: E731
    x = torch.randn(3, 64, dtype=torch.float64, generator=g) * 4
    nw = torch.rand(64, dtype=torch.float64, generator=g) + 0.5
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw
    f32 = dict(rtol=1e-5, atol=1e-5)  # the reference norm computes in f32
    torch.testing.assert_close(TORCH_LAYER_OPS.norm_linear(proj, x, nw, 1e-6), proj(h), **f32)
    y = proj(h)
    torch.testing.assert_close(TORCH_LAYER_OPS.norm_linear(proj, x, nw, 1e-6, glu=True),
                               torch.nn.functional.silu(y[:, :24]) * y[:, 24:], **f32)
    xb = x.to(torch.bfloat16)
    logits = TORCH_LAYER_OPS.norm_linear(lambda h: h @ w.T.to(h.dtype), xb, nw, 1e-6, out_f32=True)
    assert logits.dtype == torch.float32  # the bf16 result, cast
    assert torch.equal(logits, TORCH_LAYER_OPS.norm_linear(lambda h: h @ w.T.to(h.dtype), xb, nw, 1e-6).float())
    r = torch.randn(3, 48, generator=g).to(torch.bfloat16)
    got = TORCH_LAYER_OPS.linear_residual(proj, x, r)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, r + proj(x).to(torch.bfloat16))

"""Spec of the ``linear`` role: ``prepare(w)(x) = x @ W.T`` and ``dequantize(w) = W`` for every
weight type an implementation accepts, against gguf's dequantizer (bit-exact with ggml)."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from luce_core.plugin_api import QTensor, RunConfig
from luce_core.formats.blocks import BLOCKS, SUPPORTED
from luce_specs.hyp import spec_settings
from luce_specs.oracles import linear_tolerance, reference_weight

LUCE_ROLE = "linear"
LUCE_VARIANTS = {q: RunConfig(weight_types={q}) for q in SUPPORTED}
SETTINGS = spec_settings(20)


@st.composite
def weights(draw: st.DrawFn, qtype: str) -> tuple[QTensor, torch.Generator]:
    """A random (out, in) weight quantized to ``qtype``; in is whole blocks, a few of them."""
    from luce_core.formats.quantize import quantize, quantize_nvfp4

    block = BLOCKS[qtype][0]
    n_in = draw(st.integers(1, 80)) if block == 1 else block * draw(st.integers(1, 3 if block < 256 else 2))
    n_out = draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    magnitude = draw(st.sampled_from([1e-3, 0.05, 1.0, 20.0]))
    w = torch.randn(n_out, n_in, generator=gen) * magnitude
    if draw(st.booleans()):  # an outlier column, as real checkpoints have
        w[:, draw(st.integers(0, n_in - 1))] *= 8
    if qtype == "NVFP4":
        raw, scale = quantize_nvfp4(w)
        return QTensor("w", qtype, (n_out, n_in), raw, scale), gen
    return QTensor("w", qtype, (n_out, n_in), quantize(w, qtype)), gen


def _activations(draw: st.DrawFn, gen: torch.Generator, n_in: int) -> torch.Tensor:
    lead = draw(st.sampled_from([(), (1,), (2,), (5,), (9,), (2, 3)]))  # decode GEMV .. prefill GEMM
    return torch.randn(*lead, n_in, generator=gen) * draw(st.sampled_from([0.1, 1.0, 10.0]))


@SETTINGS
@given(data=st.data())
def test_prepare_matches_reference(subject, data) -> None:
    w, gen = data.draw(weights(subject.variant))
    x = _activations(data.draw, gen, w.shape[1])
    f = subject.create().prepare(w, torch.device(subject.device), torch.float32)
    y = f(x.to(subject.device))
    assert y.shape == (*x.shape[:-1], w.shape[0])
    assert y.dtype == torch.float32
    ref_w = reference_weight(w)
    expected = x.double() @ ref_w.T
    err = (y.detach().cpu().double() - expected).abs()
    tol = linear_tolerance(x.double(), ref_w)
    worst = int(torch.argmax(err - tol))
    assert bool((err <= tol).all()), (f"{w.qtype} {w.shape}, x {tuple(x.shape)}: error {float(err.flatten()[worst]):.3g} "
                                      f"> tolerance {float(tol.flatten()[worst]):.3g}")
    # a prepared weight is reused for every step: calling it again must give the same answer
    assert torch.equal(f(x.to(subject.device)).cpu(), y.cpu())


@SETTINGS
@given(data=st.data())
def test_dequantize_matches_reference(subject, data) -> None:
    w, _ = data.draw(weights(subject.variant))
    linear = subject.create()
    ref = reference_weight(w)
    got = linear.dequantize(w, torch.device(subject.device), torch.float32)
    assert got.shape == w.shape and got.dtype == torch.float32
    assert got.device.type == subject.device
    # float32 products may be fused into an FMA on a GPU: allow an ulp or two, nothing more
    torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()) + 1e-30)
    half = linear.dequantize(w, torch.device(subject.device), torch.float16)
    assert half.dtype == torch.float16 and half.shape == w.shape
    torch.testing.assert_close(half.cpu().double(), ref.half().double(), rtol=2e-3, atol=1e-7)

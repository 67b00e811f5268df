"""``--weights nvfp4``: matmul weights repacked to NVFP4 at load, checked against gguf's oracles,
the torch reference end to end, and the declared (not implemented) FP4 tensor-core linear."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import luce
from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.contract.errors import ConfigError, KernelError
from luce_core.formats.repack import matmul_groups, repack_nvfp4
from luce_gguf.loader import load_gguf
from luce_tools.models.quants import dequantize_rows
from luce_core.formats.dequant import UE4M3_TABLE, dequantize_qtensor
from luce_core.formats.quantize import quantize_nvfp4

SHAPE = dict(arch="llama", hidden=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn=192, vocab=320)
GPU = dict(torch_cuda=True, nvrtc=(13, 0), nvrtc_archs=(75, 80, 86, 89, 90, 100, 120))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """path(qtype, tied) of a tiny synthetic llama whose matrices are stored as qtype."""
    from luce_tools.models.synth import write_synthetic_gguf

    made = {}

    def path(qtype: str, tied: bool = True):
        if (qtype, tied) not in made:
            p = tmp_path_factory.mktemp("repack") / f"{qtype}_{tied}.gguf"
            write_synthetic_gguf(p, qtype=qtype, tied=tied, seed=3, outlier_channels=2, return_weights=False, **SHAPE)
            made[qtype, tied] = p
        return made[qtype, tied]
    return path


def _oracle(w) -> np.ndarray:
    return dequantize_rows(np.asarray(w.data), w.qtype, w.shape, w.scale)  # gguf.quants


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "F32"])
def test_repack_is_nvfp4_within_its_error_bound(synth, qtype) -> None:
    src = load_gguf(synth(qtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # wide sources: no compounding notice
        out = repack_nvfp4(src)
    groups = matmul_groups(src)
    assert len(groups) == 2 * 4 + 1 and groups[0] == tuple(f"blk.0.attn_{x}.weight" for x in "qkv")
    for names in groups:
        news = [out.tensors["output.weight" if n == "token_embd.weight" else n] for n in names]
        srcs = [src.tensors[n] for n in names]
        assert {w.qtype for w in news} == {"NVFP4"} and len({w.scale for w in news}) == 1  # shared scale: fusable
        rows = np.concatenate([_oracle(w) for w in srcs])
        # luce's own quantizer on the exact source values, rows of a group quantized together
        data, scale = quantize_nvfp4(torch.from_numpy(rows))
        assert np.array_equal(np.concatenate([np.asarray(w.data) for w in news]), data) and news[0].scale == scale
        for s, w in zip(srcs, news):
            assert w.shape == s.shape and w.data.shape == (s.shape[0], s.shape[1] // 64 * 36)
            got, ref = _oracle(w), _oracle(s)
            assert np.array_equal(dequantize_qtensor(w).numpy(), got)  # luce's dequantizer agrees with gguf's
            # per 16 values: the step is UE4M3(code) * tensor scale, the error at most one step
            # (E2M1's widest gap, 4..6, is two steps), and the step at most amax/6 rounded up
            # one UE4M3 increment (1/8), or E4M3's smallest subnormal step
            codes = np.asarray(w.data)[:, [c for b in range(0, w.data.shape[1], 36) for c in range(b, b + 4)]]
            step = np.repeat(UE4M3_TABLE[torch.from_numpy(codes.astype(np.int64))].numpy() * w.scale, 16, axis=1)
            err = np.abs(got - ref)
            assert (err <= step * (1 + 1e-6)).all()
            amax = np.repeat(np.abs(ref).reshape(ref.shape[0], -1, 16).max(axis=2), 16, axis=1)
            assert (step <= np.maximum(amax / 6 * 1.125, 2.0 ** -9 * w.scale) * (1 + 1e-6)).all()
            rel = np.sqrt((err ** 2).mean() / (ref ** 2).mean())
            assert 0.03 < rel < 0.13, rel  # a real 4-bit error: neither a no-op nor garbage


def test_only_matmuls_change_and_a_tied_head_gets_its_own_copy(synth) -> None:
    src = load_gguf(synth("F16"))
    assert src.config.tied_embeddings and "output.weight" not in src.tensors
    out = repack_nvfp4(src)
    matmuls = {n for g in matmul_groups(src, lm_head=False) for n in g}
    for name, w in src.tensors.items():
        if name not in matmuls:
            assert out.tensors[name] is w  # norms and the embedding lookup: untouched, still the memmap
    assert set(out.tensors) == set(src.tensors) | {"output.weight"}
    head = out.tensors["output.weight"]
    assert head.qtype == "NVFP4" and head.shape == src.tensors["token_embd.weight"].shape
    assert not out.config.tied_embeddings and out.fingerprint == src.fingerprint + "+nvfp4"
    assert out.metadata["repacked"]["from"] == {"F16": 2 * 7 + 1}
    assert out.metadata["tensor_types"]["NVFP4"] == 2 * 7 + 1
    body = repack_nvfp4(src, lm_head=False)
    assert "output.weight" not in body.tensors and body.config.tied_embeddings

    untied = load_gguf(synth("F16", tied=False))
    out = repack_nvfp4(untied)
    assert set(out.tensors) == set(untied.tensors) and out.tensors["output.weight"].qtype == "NVFP4"
    assert out.tensors["token_embd.weight"] is untied.tensors["token_embd.weight"]


def test_low_bit_source_is_repacked_with_one_notice(synth) -> None:
    src = load_gguf(synth("Q4_1"))  # SmolLM2's layout: Q4_1 matrices, Q8_0 embedding
    with pytest.warns(UserWarning) as caught:
        out = repack_nvfp4(src)
    notes = [str(w.message) for w in caught if "compounds" in str(w.message)]
    assert len(notes) == 1 and notes[0].startswith("luce: re-quantizing Q4_1 weights")  # not the Q8_0 head
    assert out.metadata["repacked"]["from"] == {"Q4_1": 14, "Q8_0": 1}
    again = repack_nvfp4(out)  # NVFP4 already: nothing to do
    assert all(again.tensors[n] is out.tensors[n] for n in out.tensors)


def test_generate_with_nvfp4_weights_is_close_to_native(synth, one_torch_thread) -> None:
    from luce_tools.quality.kv import all_logprobs, compare, kv_store
    from luce_tools.quality.weights import measure

    path = synth("F16")
    native = luce.load(path, device="cpu", dtype="f32", progress=False)
    nvfp4 = luce.load(path, device="cpu", dtype="f32", weights="nvfp4", progress=False)
    assert nvfp4.selected()["linear"] == "torch" and nvfp4.plan.config.weights == "nvfp4"
    assert "NVFP4" in nvfp4.plan.config.weight_types and "NVFP4" not in native.plan.config.weight_types
    assert len(list(nvfp4.generate_ids([5, 6, 7], 6, stop_ids=()))) == 6
    ids = [int(i) for i in torch.randint(3, 320, (96,), generator=torch.Generator().manual_seed(1))]
    ref = all_logprobs(native.plan.model, ids, kv_store(native, "f32", "f32", False, len(ids)))
    got = all_logprobs(nvfp4.plan.model, ids, kv_store(nvfp4, "f32", "f32", False, len(ids)))
    r = compare(ref, got)
    # the tool measures the same thing luce.load(weights="nvfp4") runs, and NVFP4 costs about
    # what another 4-bit format does, far more than Q8_0
    m = {c["weights"]: c for c in measure(native, ids)["configs"]}
    assert m["nvfp4"]["mean_kl"] == pytest.approx(r["mean_kl"], rel=1e-4, abs=1e-7)
    assert m["q8_0"]["mean_kl"] * 20 < r["mean_kl"] < 2 * m["q4_0"]["mean_kl"]
    assert 0 < r["mean_kl"] < 0.005 and r["top1_agreement"] > 0.85, r
    assert m["nvfp4"]["matmul_bytes"] < 0.3 * measure.__globals__["matmul_bytes"](native.plan.loaded)


def test_fp4_tensor_core_linear_is_declared_but_refuses(synth) -> None:
    from luce_core import plugin_host
    from luce_core.doctor import report
    from luce_core.plan import Chooser
    from luce_cuda import fp4tc, plugin

    impl = next(i for i in plugin.provide_linear() if i.name == "cuda-fp4tc")
    assert impl.priority > max(i.priority for i in plugin.provide_linear() if i.name != impl.name)
    nv = RunConfig(weights="nvfp4")
    h100 = Caps(**GPU).with_overrides("cc=9.0")
    assert impl.reasons(h100, nv) == ["needs SM 10.0 or 12.0 FP4 tensor cores (have 9.0)"]
    assert "weights are not NVFP4 (use --weights nvfp4 or an NVFP4 GGUF)" in \
        impl.reasons(h100, RunConfig(weight_types={"Q4_1", "F32"}))
    assert impl.reasons(Caps(), nv) == ["no NVIDIA GPU"]
    for cc in ("10.0", "12.0"):
        blackwell = Caps(**GPU).with_overrides(f"cc={cc}")
        assert impl.reasons(blackwell, nv) == [] and impl.reasons(blackwell, RunConfig(weight_types={"NVFP4"})) == []
    with pytest.raises(KernelError, match="not implemented"):
        fp4tc.make(Caps(**GPU).with_overrides("cc=10.0"), nv)

    # selected on SM 10.0, it fails at construction and plan falls back, with one warning
    torch_impl = next(i for i in plugin_host.host().impls("linear") if i.name == "torch")
    ch = Chooser(Caps(**GPU).with_overrides("cc=10.0"), nv)
    ch.impls = lambda role: [impl, torch_impl]
    with pytest.warns(UserWarning, match="(?s)cuda-fp4tc.*not implemented.*falling back") as caught:
        chosen, _ = ch.create("linear")
    assert chosen.name == "torch" and len(caught) == 1

    text = report(str(synth("F16")), caps="cc=7.5,torch_cuda=1,nvrtc=13.0", overrides={"weights": "nvfp4"})
    line = next(x for x in text.splitlines() if "cuda-fp4tc" in x)
    assert line.endswith("needs SM 10.0 or 12.0 FP4 tensor cores (have 7.5)"), line


def test_weights_flag_and_env(monkeypatch) -> None:
    from luce_core.cli import build_parser, run_overrides

    monkeypatch.delenv("LUCE_WEIGHTS", raising=False)
    for cmd in ("generate", "bench", "doctor"):
        args, _ = build_parser().parse_known_args([cmd, "--weights", "nvfp4"])
        assert RunConfig(**run_overrides(args)).weights == "nvfp4"
    args, _ = build_parser().parse_known_args(["generate", "x"])
    assert RunConfig(**run_overrides(args)).weights == "native" == RunConfig().weights
    monkeypatch.setenv("LUCE_WEIGHTS", "nvfp4")
    assert RunConfig(**run_overrides(args)).weights == "nvfp4" == RunConfig().weights
    args, _ = build_parser().parse_known_args(["generate", "x", "--weights", "native"])
    assert RunConfig(**run_overrides(args)).weights == "native"  # the flag wins over the env
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "x", "--weights", "int3"])
    with pytest.raises(ConfigError, match="weights"):
        RunConfig(weights="int3")

"""Run options: one switch, honoured the same way by the API and the CLI."""
from __future__ import annotations

import pytest

from luce_core.cli import build_parser, run_overrides
from luce_core.config import DEFAULT_KV, RunConfig
from luce_core.contract.errors import ConfigError


@pytest.mark.parametrize("env,expected", [(None, True), ("1", True), ("0", False), ("off", False), ("false", False)])
def test_kv_rotation_env_sets_the_default(monkeypatch, env, expected) -> None:
    if env is None:
        monkeypatch.delenv("LUCE_KV_ROTATION", raising=False)
    else:
        monkeypatch.setenv("LUCE_KV_ROTATION", env)
    assert RunConfig().kv_rotation is expected  # what luce.load() builds
    args, _ = build_parser().parse_known_args(["generate", "x"])
    assert RunConfig(**run_overrides(args)).kv_rotation is expected  # what the CLI builds
    args, _ = build_parser().parse_known_args(["generate", "x", "--no-kv-rotation"])
    assert RunConfig(**run_overrides(args)).kv_rotation is False


def test_defaults_and_bad_values() -> None:
    c = RunConfig()
    assert (c.kv_k, c.kv_v) == DEFAULT_KV == ("f16", "f16")
    with pytest.raises(ConfigError, match="kv_k"):
        RunConfig(kv_k="q5_0")
    with pytest.raises(ConfigError, match="ctx") as e:
        RunConfig(ctx=-5)
    assert "--ctx" in e.value.remedy


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value,flag", [
    ("temperature", NAN, "--temp"), ("temperature", INF, "--temp"), ("temperature", -0.1, "--temp"),
    ("temperature", "0.7", "--temp"), ("top_k", -1, "--top-k"), ("top_k", 2.5, "--top-k"),
    ("top_p", NAN, "--top-p"), ("top_p", 0.0, "--top-p"), ("top_p", INF, "--top-p"),
    ("min_p", NAN, "--min-p"), ("min_p", 1.0, "--min-p"),
    ("repetition_penalty", NAN, "--repeat-penalty"), ("repetition_penalty", INF, "--repeat-penalty"),
    ("repetition_penalty", 0.0, "--repeat-penalty"),
    ("seed", -1, "--seed"), ("seed", 2**64, "--seed"), ("seed", 2**70, "--seed"), ("seed", 1.0, "--seed"),
    ("seed", True, "--seed"),
])
def test_sampling_params_refuse_what_cannot_sample(field, value, flag) -> None:
    """The API refuses NaN, inf, out-of-range and mistyped sampling values as the CLI does, with
    the field and its flag named (before any model work: the CLI checks them before loading)."""
    from luce_core.sampling import SamplingParams

    with pytest.raises(ConfigError, match=f"{field} \\({flag}\\)") as e:
        SamplingParams(**{field: value})
    assert e.value.remedy


def test_sampling_params_take_the_whole_valid_range() -> None:
    from luce_core.sampling import Sampler, SamplingParams

    for seed in (0, 2**64 - 1):
        Sampler(SamplingParams(temperature=0.7, top_k=1, top_p=1.0, min_p=0.0, repetition_penalty=0.5, seed=seed))
    assert SamplingParams(temperature=0, seed=None).greedy


def test_prefill_chunk_is_configurable_and_does_not_change_results(tmp_path) -> None:
    """--prefill-chunk / luce.load(prefill_chunk=...) sets the prompt tokens per prefill forward;
    any chunking gives the same logits (f32) and the same greedy text; 0 is refused."""
    import torch

    import luce
    from luce_core.cli import build_parser, run_overrides
    from drafting_fixtures import write_tiny

    args, _ = build_parser().parse_known_args(["generate", "x", "--prefill-chunk", "7"])
    assert RunConfig(**run_overrides(args)).prefill_chunk == 7
    with pytest.raises(ConfigError, match="prefill_chunk must be a positive integer"):
        RunConfig(prefill_chunk=-1)
    assert RunConfig().prefill_chunk == 0  # automatic: the attention implementation's choice
    path = write_tiny(tmp_path / "t.gguf", seed=2)
    prompt = list(range(5, 45))
    outs = []
    for chunk in (7, 512):
        llm = luce.load(path, device="cpu", dtype="f32", ctx=128, prefill_chunk=chunk, progress=False)
        assert llm.session.prefill_chunk == chunk
        logits, _ = llm.session.prefill(prompt)
        llm.session.truncate(0)
        outs.append((logits, list(llm.generate_ids(prompt, 8))))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)
    assert outs[0][1] == outs[1][1]
    auto = luce.load(path, device="cpu", dtype="f32", ctx=128, progress=False)
    assert auto.session.prefill_chunk == 512  # the torch attention states no preference


def test_prefill_chunk_automatic_takes_the_attention_preference(tmp_path, monkeypatch) -> None:
    """prefill_chunk 0 (the default) is resolved by the Session from the attention
    implementation's ``prefill_chunk`` (luce_cuda's: 4096); a set value wins."""
    import luce
    from luce_core.session import Session
    from drafting_fixtures import write_tiny
    from luce_torch.attention import TorchAttention

    path = write_tiny(tmp_path / "t.gguf", seed=2)
    monkeypatch.setattr(TorchAttention, "prefill_chunk", 24, raising=False)
    llm = luce.load(path, device="cpu", dtype="f32", ctx=128, progress=False)
    assert llm.session.prefill_chunk == 24
    assert Session(llm.plan.model, llm.plan.kv, 128).prefill_chunk == 24  # internal sessions too
    assert luce.load(path, device="cpu", dtype="f32", ctx=128, prefill_chunk=7,
                     progress=False).session.prefill_chunk == 7

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

"""Run options: one switch, honoured the same way by the API and the CLI."""
from __future__ import annotations

import pytest

from luce_core.cli import _overrides, build_parser
from luce_core.config import DEFAULT_KV, RunConfig
from luce_core.errors import ConfigError


@pytest.mark.parametrize("env,expected", [(None, True), ("1", True), ("0", False), ("off", False), ("false", False)])
def test_kv_rotation_env_sets_the_default(monkeypatch, env, expected) -> None:
    if env is None:
        monkeypatch.delenv("LUCE_KV_ROTATION", raising=False)
    else:
        monkeypatch.setenv("LUCE_KV_ROTATION", env)
    assert RunConfig().kv_rotation is expected  # what luce.load() builds
    args, _ = build_parser().parse_known_args(["generate", "x"])
    assert RunConfig(**_overrides(args)).kv_rotation is expected  # what the CLI builds
    args, _ = build_parser().parse_known_args(["generate", "x", "--no-kv-rotation"])
    assert RunConfig(**_overrides(args)).kv_rotation is False


def test_defaults_and_bad_values() -> None:
    c = RunConfig()
    assert (c.kv_k, c.kv_v) == DEFAULT_KV == ("f16", "f16")
    with pytest.raises(ConfigError, match="kv_k"):
        RunConfig(kv_k="q5_0")

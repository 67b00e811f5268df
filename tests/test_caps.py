"""The capability probe on this (GPU-less) machine, the LUCE_CAPS / with_overrides override, and
the rule that importing luce_core and collecting every first-party descriptor imports no torch."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from luce_core import caps as caps_mod
from luce_core.caps import Caps, probe, tensor_core_flags
from luce_core.contract.errors import ConfigError


def _has_nvidia_gpu() -> bool:
    return bool(caps_mod._nvml_gpu())


def test_probe_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if _has_nvidia_gpu():
        pytest.skip("this machine has an NVIDIA GPU; the no-GPU probe is checked on CPU machines")
    monkeypatch.delenv("LUCE_CAPS", raising=False)
    c = probe()
    assert c.device == "cpu" and c.cc is None and c.sm == 0 and c.arch == ""
    assert (c.gpu_name, c.sm_count, c.gpu_memory, c.torch_cuda) == ("", 0, 0, False)
    assert not (c.fp16_tc or c.bf16_tc or c.fp8_tc or c.fp4_tc)
    assert c.overridden == ()
    assert c.cpu_flags  # read from /proc/cpuinfo on Linux
    assert hash(c) == hash(probe())  # frozen, hashable, and the probe is cached
    json.dumps(c.summary())  # doctor prints it


@pytest.mark.parametrize("spec, expected", [
    ("cc=7.5", dict(cc=(7, 5), fp16_tc=True, bf16_tc=False, fp8_tc=False, fp4_tc=False)),
    ("cc=75", dict(cc=(7, 5), fp16_tc=True, bf16_tc=False)),
    ("cc=sm_86", dict(cc=(8, 6), fp16_tc=True, bf16_tc=True, fp8_tc=False)),
    ("cc=8.9", dict(cc=(8, 9), bf16_tc=True, fp8_tc=True, fp4_tc=False)),
    ("cc=9.0", dict(cc=(9, 0), fp16_tc=True, bf16_tc=True, fp8_tc=True, fp4_tc=False)),
    ("cc=10.0", dict(cc=(10, 0), fp4_tc=True)),
    ("cc=12.0", dict(cc=(12, 0), bf16_tc=True, fp8_tc=True, fp4_tc=True)),
    ("cc=9.0,bf16_tc=0", dict(cc=(9, 0), bf16_tc=False, fp8_tc=True)),  # an explicit flag wins
    ("cc=7.5, sm_count=68, gpu_memory=11e9", dict(sm_count=68, gpu_memory=11_000_000_000)),
    ("device=cuda,nvrtc_archs=75+90", dict(device="cuda", nvrtc_archs=(75, 90))),
    ("cpu_flags=avx2 fma", dict(cpu_flags=frozenset({"avx2", "fma"}))),
])
def test_override(spec: str, expected: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    forced = Caps().with_overrides(spec)
    for field, value in expected.items():
        assert getattr(forced, field) == value, field
    assert set(forced.overridden) >= {part.split("=")[0].strip() for part in spec.split(",")}
    monkeypatch.setenv("LUCE_CAPS", spec)  # the environment applies the same override to the probe
    from_env = probe()
    for field, value in expected.items():
        assert getattr(from_env, field) == value, field
    assert probe("").overridden == ()  # an explicit empty override ignores LUCE_CAPS


def test_tensor_core_flags_table() -> None:
    assert tensor_core_flags(None) == dict(fp16_tc=False, bf16_tc=False, fp8_tc=False, fp4_tc=False)
    assert tensor_core_flags((7, 0))["fp16_tc"] and not tensor_core_flags((6, 1))["fp16_tc"]
    assert not tensor_core_flags((9, 0))["fp4_tc"] and tensor_core_flags((12, 1))["fp4_tc"]


@pytest.mark.parametrize("spec", ["cc", "cc=abc", "cc=7.5.1", "nonsense=1", "sm_count=many", "fp16_tc=maybe",
                                  "device=tpu", "nvrtc_archs=75+x", "cc=7.5,,oops"])
def test_bad_override_is_a_config_error(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as e:
        Caps().with_overrides(spec)
    assert e.value.remedy  # says how to write it
    monkeypatch.setenv("LUCE_CAPS", spec)
    with pytest.raises(ConfigError):
        probe()


_NO_HEAVY_IMPORTS = """
import importlib, json, sys
import luce_core
for mod in ("caps", "config", "contract.errors", "formats.blocks", "contract.hookspecs", "contract.impl",
            "plugin_host", "contract.roles", "contract.types", "contract.drafting", "plugin_api", "selection"):
    importlib.import_module("luce_core." + mod)
modules = json.loads(sys.argv[1])
for name in modules:
    importlib.import_module(name)
from luce_core import plugin_host
from luce_core.contract.impl import ROLES
host = plugin_host.host()
found = {role: [i.name for i in host.impls(role)] for role in ROLES}
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cuda", "transformers", "triton"))
print(json.dumps({"heavy": heavy, "plugins": host.plugin_names(), "found": found}))
"""


def test_core_and_first_party_plugins_import_no_torch() -> None:
    eps = [ep for ep in importlib.metadata.distribution("luce").entry_points if ep.group == "luce"]
    assert eps, "the luce distribution declares no entry points in group 'luce'"
    modules = sorted(ep.value.partition(":")[0] for ep in eps)
    proc = subprocess.run([sys.executable, "-c", _NO_HEAVY_IMPORTS, json.dumps(modules)],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k not in ("LUCE_PLUGINS", "LUCE_DISABLE_PLUGINS")})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [], f"imported at plugin import / descriptor time: {got['heavy']}"
    assert set(got["plugins"]) >= {ep.name for ep in eps}
    assert got["found"]["linear"] and got["found"]["kv_storage"]  # descriptors were really collected

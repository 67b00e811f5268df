"""The example third-party plugin (tests/example_plugin), pip-installed for real into a temporary
directory and used from subprocesses: discovery through its entry point, ``requires`` honoured
by selection, selection by priority once enabled, and the linear spec passing on it. A plugin
with a planted bug, discovered the same way, must fail the spec: the specs can fail."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE_SRC = Path(__file__).parent / "example_plugin"
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "NVFP4")
# variables that would change which plugins load or which linear is chosen in the subprocesses
_LUCE_ENV = ("LUCE_PLUGINS", "LUCE_DISABLE_PLUGINS", "LUCE_LINEAR", "LUCE_SPECS_PLUGIN", "LUCE_CAPS",
             "LUCE_EXAMPLE_ENABLE")


@pytest.fixture(scope="session")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/example_plugin installed with pip into its own directory (a copy is built, so the
    build leaves no build/ or egg-info in the repository)."""
    root = tmp_path_factory.mktemp("example_plugin")
    src, site = root / "src", root / "site"
    shutil.copytree(EXAMPLE_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
         "--disable-pip-version-check", "-q", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return site


def _env(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LUCE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


_SELECTION_PROBE = textwrap.dedent("""
    import json, sys
    from luce_core import plugin_host, selection
    from luce_core.caps import probe
    from luce_core.config import RunConfig
    from luce_core.contract.errors import SelectionError

    host = plugin_host.host()
    impls = host.impls("linear")
    caps, config = probe(), RunConfig(weight_types={"Q4_1", "Q8_0", "F32"})
    try:
        selected = selection.select("linear", impls, caps, config).name
    except SelectionError as e:
        selected = "error: " + str(e)
    print(json.dumps({
        "plugins": host.plugin_names(),
        "distribution": host.distributions.get("example"),
        "candidates": {c.impl.name: {"plugin": c.impl.plugin, "priority": c.impl.priority,
                                     "reasons": list(c.reasons), "selected": c.selected}
                       for c in selection.explain("linear", impls, caps, config)},
        "selected": selected,
        "torch_imported": "torch" in sys.modules,
    }))
""")


def _probe(site: Path, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _SELECTION_PROBE], env=_env(site, **env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_discovered_but_not_selected_until_enabled(example_site: Path) -> None:
    got = _probe(example_site)
    assert "example" in got["plugins"]
    assert got["distribution"] == "luce-example-plugin 0.1.0"
    example = got["candidates"]["example-f32"]
    assert example["plugin"] == "example" and example["priority"] == 100
    assert not example["selected"]
    assert any("LUCE_EXAMPLE_ENABLE=1" in r for r in example["reasons"]), example["reasons"]
    assert got["selected"] != "example-f32" and got["candidates"][got["selected"]]["selected"]
    # descriptors and requires() only: selecting imported no torch
    assert got["torch_imported"] is False


def test_selected_by_priority_when_enabled(example_site: Path) -> None:
    got = _probe(example_site, LUCE_EXAMPLE_ENABLE="1")
    assert got["selected"] == "example-f32"
    example = got["candidates"]["example-f32"]
    assert example["selected"] and example["reasons"] == []
    others = [c for name, c in got["candidates"].items() if name != "example-f32"]
    assert all(not c["selected"] for c in others)
    assert all(c["priority"] < 100 for c in others if not c["reasons"])


def _run_specs(site: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "luce_specs.runner", *args, "-v", "-W", "ignore::DeprecationWarning"],
        env=_env(site, OMP_NUM_THREADS="1", **env), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_linear_spec_passes_on_example(example_site: Path, tmp_path: Path) -> None:
    # from an unrelated directory: the runner finds the specs as an installed package
    proc = _run_specs(example_site, tmp_path, "--plugin", "example", "--max-examples", "6",
                      LUCE_EXAMPLE_ENABLE="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for qtype in QTYPES:
        for test in ("test_prepare_matches_reference", "test_dequantize_matches_reference"):
            assert f"{test}[example.example-f32-{qtype}] PASSED" in out, f"{test} {qtype} did not pass:\n{out[-3000:]}"
    assert "torch.torch" not in out  # --plugin restricts the run to the example's implementations
    assert "no attention implementation from plugin 'example' installed" in out  # roles it lacks: said so


_BROKEN_PLUGIN = '''
"""A linear implementation with a planted bug: the last input feature is ignored."""
from luce_core.plugin_api import CONTRACT_VERSION, Impl, hookimpl


class BrokenLinear:
    def __init__(self, caps=None, config=None):
        pass

    def dequantize(self, w, device, dtype):
        from luce_core.formats.dequant import dequantize_qtensor

        out = dequantize_qtensor(w, device).clone()  # F32 weights come back as a view
        out[..., -1] = 0
        return out.to(dtype)

    def prepare(self, w, device, dtype):
        weight = self.dequantize(w, device, dtype)
        return lambda x: x.to(dtype) @ weight.T


@hookimpl
def provide_linear():
    return [Impl("linear", "broken", "luce_broken_example:BrokenLinear", priority=-1,
                 contract=CONTRACT_VERSION)]
'''


def test_spec_fails_on_a_broken_linear(tmp_path: Path) -> None:
    # installed the way pip would (a dist-info with an entry point), without a build
    site = tmp_path / "site"
    (site / "luce_broken_example-0.1.dist-info").mkdir(parents=True)
    (site / "luce_broken_example.py").write_text(_BROKEN_PLUGIN)
    (site / "luce_broken_example-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: luce-broken-example\nVersion: 0.1\n")
    (site / "luce_broken_example-0.1.dist-info" / "entry_points.txt").write_text(
        "[luce]\nbroken = luce_broken_example\n")
    proc = _run_specs(site, tmp_path, "--plugin", "broken", "-k", "Q4_0")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "test_dequantize_matches_reference[broken.broken-Q4_0] FAILED" in out
    assert "test_prepare_matches_reference[broken.broken-Q4_0] FAILED" in out

"""The example third-party KV store (tests/example_kv_plugin): written only against
luce_core.plugin_api, with a layout of its own (opaque to luce) and none of the optional members.
It passes the kv_storage spec; forced on the CPU it generates what the built-in store does, token
for token; selection never pairs it with an attention implementation that reads only dense-v1
stores (the reason is shown), and a CUDA run without write_at says that graphs are off."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import luce
from gpu import needs_gpu
from luce_core import plugin_host

SRC = Path(__file__).parent / "example_kv_plugin"
PACKAGE = "luce_example_kv"
NAME = "example-kv"
LAYOUT_REASON = f"reads KV layouts dense-v1 only; kv_storage '{NAME}' provides opaque"
_LUCE_ENV = ("LUCE_PLUGINS", "LUCE_DISABLE_PLUGINS", "LUCE_KV_STORAGE", "LUCE_ATTENTION", "LUCE_SPECS_PLUGIN",
             "LUCE_CAPS")


def test_imports_only_the_plugin_surface() -> None:
    for path in (SRC / PACKAGE).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert not n.startswith(("luce_torch", "luce_cuda")), f"{path.name} imports {n}"
                assert not n.startswith("luce_core") or n == "luce_core.plugin_api", f"{path.name} imports {n}"


@pytest.fixture()
def registered(monkeypatch: pytest.MonkeyPatch):
    """The plugin registered in this process, as its entry point would register it."""
    monkeypatch.syspath_prepend(str(SRC))
    for var in _LUCE_ENV:
        monkeypatch.delenv(var, raising=False)
    import luce_example_kv.plugin

    plugin_host.host().register(luce_example_kv.plugin, NAME)
    return luce_example_kv.plugin


def test_kv_storage_spec_passes(tmp_path: Path) -> None:
    # installed the way pip would (package + dist-info with the entry point), without a build
    site = tmp_path / "site"
    shutil.copytree(SRC / PACKAGE, site / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    info = site / "luce_example_kv-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: luce-example-kv-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[luce]\n{NAME} = {PACKAGE}.plugin\n")
    env = {k: v for k, v in os.environ.items() if k not in _LUCE_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "luce_specs.runner", "--plugin", NAME, "-k", "kv_storage",
                           "--max-examples", "6", "-v", "-W", "ignore::DeprecationWarning"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for variant in ("f32", "f16", "bf16", "bf16+f16"):
        for test in ("test_round_trip_within_dtype_bound", "test_restore_gives_back_the_snapshot",
                     "test_truncate_then_rewrite", "test_memory_accounting"):
            assert f"{test}[{NAME}.{NAME}-{variant}] PASSED" in out, f"{test} {variant}:\n{out[-3000:]}"
    assert "refuses q8_0: stores float K/V only" in out  # what it cannot store: skipped with its reason
    assert f"test_layout_view_holds_what_read_returns[{NAME}.{NAME}-f16] SKIPPED" in out  # opaque: no view


def _greedy(smollm2_path: Path, **roles: str) -> tuple[list[int], dict[str, str]]:
    llm = luce.load(smollm2_path, device="cpu", ctx=256, progress=False, **roles)
    ids = list(llm.generate_ids("The capital of France is", 24, temperature=0.0))
    return ids, llm.selected()


def test_generates_what_the_built_in_store_does(registered, smollm2_path: Path, one_torch_thread) -> None:
    mine, chosen = _greedy(smollm2_path, kv_storage=NAME)
    assert chosen["kv_storage"] == NAME and chosen["attention"] == "torch"
    builtin, chosen = _greedy(smollm2_path, kv_storage="torch")
    assert chosen["kv_storage"] == "torch"
    assert len(mine) == 24 and mine == builtin


def test_doctor_shows_why_dense_only_attention_is_not_paired(registered) -> None:
    import json

    from luce_core import doctor

    got = json.loads(doctor.report(None, overrides={"kv_storage": NAME}, as_json=True))
    kv = {r["name"]: r for r in got["roles"]["kv_storage"]}
    assert kv[NAME]["selected"]  # forced: the store the attention candidates are paired against
    cuda = next(r for r in got["roles"]["attention"] if r["name"] == "cuda")
    assert not cuda["selected"] and LAYOUT_REASON in cuda["reasons"]
    torch_row = next(r for r in got["roles"]["attention"] if r["name"] == "torch")
    assert torch_row["selected"] and torch_row["reasons"] == []
    assert LAYOUT_REASON in doctor.report(None, overrides={"kv_storage": NAME})  # the text shows it too
    # with the built-in store the pair is not refused for its layout
    got = json.loads(doctor.report(None, as_json=True))
    cuda = next(r for r in got["roles"]["attention"] if r["name"] == "cuda")
    assert not any("KV layouts" in r for r in cuda["reasons"])


def test_a_store_without_write_at_says_graphs_are_off(registered) -> None:
    from luce_core.config import RunConfig
    from luce_core.contract.types import KVSpec
    from luce_core.plan import eager_decode_reason
    from luce_example_kv.store import ListKVStorage

    impl = next(i for i in plugin_host.host().impls("kv_storage") if i.name == NAME)
    store = ListKVStorage().allocate(KVSpec(n_layers=1, n_kv_heads=1, head_dim=64, capacity=4))
    why = eager_decode_reason(RunConfig(cuda_graphs=True), "cuda", impl, store)
    assert why is not None and f"kv_storage '{NAME}' has no write_at" in why and "without CUDA graphs" in why
    assert eager_decode_reason(RunConfig(cuda_graphs=False), "cuda", impl, store) is None
    assert eager_decode_reason(RunConfig(cuda_graphs=True), "cpu", impl, store) is None
    from luce_torch.kv import TorchKVStorage  # a store with write_at: nothing to say

    torch_impl = next(i for i in plugin_host.host().impls("kv_storage") if i.name == "torch")
    assert eager_decode_reason(RunConfig(cuda_graphs=True), "cuda", torch_impl, TorchKVStorage().allocate(store.spec)) is None


@pytest.mark.gpu
@needs_gpu
def test_on_cuda_refused_by_cuda_attention_and_run_eagerly(registered, smollm2_path: Path) -> None:
    from luce_core.contract.errors import SelectionError

    with pytest.raises(SelectionError, match=LAYOUT_REASON):
        luce.load(smollm2_path, device="cuda", kv_storage=NAME, attention="cuda", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = luce.load(smollm2_path, device="cuda", kv_storage=NAME, progress=False)
    assert llm.selected()["attention"] == "torch" and llm.session.graphs is None
    assert any(f"kv_storage '{NAME}' has no write_at" in str(w.message) for w in caught)
    assert len(list(llm.generate_ids("The capital of France is", 8, temperature=0.0))) == 8

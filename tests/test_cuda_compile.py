"""luce_cuda's compile service, on the CPU: every kernel program compiles to CUBIN for every
arch luce targets, the disk cache works, errors carry the NVRTC log, plugin reasons."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.contract.types import ModelConfig
from luce_core.selection import explain

try:
    from luce_cuda.compile import KernelCompileError, nvrtc_version

    nvrtc_version()
    NO_NVRTC = ""
except Exception as e:  # noqa: BLE001 - any failure means the toolchain is not usable here
    NO_NVRTC = f"NVRTC is not installed or cannot load ({e}); pip install 'luce[cuda]'"

needs_nvrtc = pytest.mark.skipif(bool(NO_NVRTC), reason=NO_NVRTC or "-")
# One arch per source path: the kernels branch only on __CUDA_ARCH__ >= 900 and the programs on
# min_sm (75 or 80), so 86 and 89 compile sm_80's source with their own code generation; every
# program for those two would double this test's NVRTC time on CI's 2 cores for no new source
# path, so test_ampere_variants_compile builds a sample of them.
ARCHS = (75, 80, 90, 120)


def _compile_one(item: tuple[str, int]) -> tuple[str, int, bytes]:
    from luce_cuda import programs
    from luce_cuda.compile import compile_program

    name, sm = item
    prog = {p.name: p for p in programs.ALL}[name]
    return name, sm, compile_program(prog, sm)


@needs_nvrtc
def test_every_kernel_compiles_to_cubin_for_every_arch():
    from luce_cuda import programs

    items = [(p.name, sm) for sm in ARCHS for p in programs.ALL if p.supports(sm)]
    # NVRTC work dominates; spread it over processes (spawn: no inherited CUDA state).
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1), mp_context=mp.get_context("spawn")) as ex:
        results = list(ex.map(_compile_one, items, chunksize=4))
    by_name = {p.name: p for p in programs.ALL}
    assert len(results) == len(items)
    for name, sm, cubin in results:
        assert cubin[:4] == b"\x7fELF", f"{name} sm_{sm} is not a cubin"
        for kernel in by_name[name].kernels:  # each declared entry point is a symbol of the cubin
            assert b"\0" + kernel.encode() + b"\0" in cubin, f"{kernel} missing from {name} sm_{sm}"
    # every arch luce targets got every program that claims it
    assert {sm for _, sm, _ in results} == set(ARCHS)
    assert sum(1 for _, sm, _ in results if sm == 75) == sum(1 for p in programs.ALL if p.min_sm <= 75)
    print(f"compiled {len(items)} (program, arch) pairs in {time.time() - t0:.1f} s")


@needs_nvrtc
@pytest.mark.parametrize("sm", [86, 89])
def test_ampere_variants_compile(sm):
    """sm_86 and sm_89 (RTX 30xx / 40xx) build: a BF16 tensor-core GEMM, the GEMV and the decode
    attention, the programs with the most registers and shared memory."""
    from luce_cuda import programs

    names = [programs.GEMM_BF16["q4_k"].name, programs.GEMV["q4_k"].name, programs.ATTN_DECODE["q8_0"].name]
    for name, got_sm, cubin in map(_compile_one, [(n, sm) for n in names]):
        assert got_sm == sm and cubin[:4] == b"\x7fELF", name


@needs_nvrtc
def test_bf16_programs_refuse_sm75():
    from luce_cuda import programs
    from luce_cuda.compile import compile_program

    with pytest.raises(KernelCompileError, match="needs SM >= 8.0"):
        compile_program(programs.GEMM_BF16["q4_0"], 75)


SCALE_SRC = r'''
extern "C" __global__ void scale_kernel(float* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}
'''


@needs_nvrtc
def test_disk_cache_hits_and_keys(tmp_path, monkeypatch):
    from luce_cuda import compile as cc

    monkeypatch.setenv("LUCE_CACHE", str(tmp_path))
    prog = cc.KernelProgram(name="scale", source="scale.cu", kernels=("scale_kernel",), code=SCALE_SRC)
    first = cc.compile_program(prog, 80)
    files = list((tmp_path / "cubin").iterdir())
    assert len(files) == 1 and files[0].read_bytes() == first

    def no_nvrtc():
        raise AssertionError("cache miss: NVRTC was called")

    monkeypatch.setattr(cc, "_program_class", no_nvrtc)
    assert cc.compile_program(prog, 80) == first  # served from disk
    # anything that changes the binary changes the key
    keys = {cc.cache_key(prog, 80), cc.cache_key(prog, 86),
            cc.cache_key(cc.KernelProgram(name="scale", source="scale.cu", kernels=("scale_kernel",),
                                          code=SCALE_SRC + "\n"), 80),
            cc.cache_key(cc.KernelProgram(name="scale", source="scale.cu", kernels=("scale_kernel",),
                                          code=SCALE_SRC, defines=(("X", "1"),)), 80)}
    assert len(keys) == 4
    with pytest.raises(AssertionError, match="cache miss"):
        cc.compile_program(prog, 86)


@needs_nvrtc
def test_compile_error_shows_log_and_kernel_name(tmp_path, monkeypatch):
    from luce_cuda import compile as cc

    monkeypatch.setenv("LUCE_CACHE", str(tmp_path))
    bad = cc.KernelProgram(name="broken", source="broken.cu", kernels=("broken_kernel",),
                           code='extern "C" __global__ void broken_kernel(float* x) { x[0] = undefined_thing; }')
    with pytest.raises(KernelCompileError) as err:
        cc.compile_program(bad, 90)
    text = str(err.value)
    assert "broken_kernel" in text and "undefined_thing" in text and "sm_90" in text
    assert err.value.remedy
    assert not (tmp_path / "cubin").exists() or not list((tmp_path / "cubin").iterdir())


def test_every_kernel_waits_for_the_previous_grid_first():
    """luce launches its kernels with programmatic dependent launch on SM 9.0+: a kernel's blocks
    may run while the previous kernel is still writing, so each entry point's first statement
    must be grid_dependency_sync() (luce_common.cuh), or one call of a before_wait_* function
    (reads only what the previous kernel does not write) followed by it."""
    import re

    from luce_cuda import programs
    from luce_cuda.compile import KERNEL_DIR

    checked = prewait = 0
    for prog in programs.ALL:
        assert prog.pdl, f"{prog.name} is launched without PDL: mark it pdl=True once its kernels wait"
        src = (KERNEL_DIR / prog.source).read_text()
        for m in re.finditer(r"__global__[^{;]*\{", src):
            body = src[m.end():]
            pre = re.match(r"[\s\\]*(?:const \w+ \w+ = )?before_wait_\w+(?:<[^>]*>)?\s*\([^;]*\);", body)
            if pre:
                body = body[pre.end():]
            first = re.match(r"[\s\\]*(\w+)\s*\(", body)
            assert first and first.group(1) == "grid_dependency_sync", \
                f"{prog.source}: a kernel does not start with grid_dependency_sync(): {src[m.start():m.end()][:120]!r}"
            checked += 1
            prewait += bool(pre)
    assert checked >= 12 and prewait >= 2  # the GEMV and flash-decode prefetch


def _ptx(src: bytes, sm: int, defines: tuple[tuple[str, str], ...] = ()) -> str:
    """PTX of a kernel source for compute_<sm>, from NVRTC directly (PTX needs no driver)."""
    from cuda.bindings import nvrtc

    from luce_cuda import compile as cc

    _, prog = nvrtc.nvrtcCreateProgram(src, b"test.cu", 0, [], [])
    opts = [f"--gpu-architecture=compute_{sm}".encode(), b"-std=c++17", f"-I{cc.KERNEL_DIR}".encode(),
            *(f"-I{d}".encode() for d in cc.include_dirs()), *(f"-D{k}={v}".encode() for k, v in defines)]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    assert int(err) == 0, err
    _, n = nvrtc.nvrtcGetPTXSize(prog)
    buf = b" " * n
    nvrtc.nvrtcGetPTX(prog, buf)
    return buf.decode()


@needs_nvrtc
def test_grid_dependency_sync_is_griddepcontrol_from_sm90_only():
    src = (b'#include "luce_common.cuh"\n'
           b'extern "C" __global__ void pdl_kernel(float* x) { grid_dependency_sync(); x[threadIdx.x] += 1.f; }')
    sm90 = _ptx(src, 90)
    assert "griddepcontrol.wait" in sm90 and "griddepcontrol.launch_dependents" in sm90
    assert sm90.index("griddepcontrol.wait") < sm90.index("ld.global")  # before any global access
    assert "griddepcontrol" not in _ptx(src, 80)


@needs_nvrtc
def test_weights_and_kv_rows_are_prefetched_before_the_wait(monkeypatch):
    """The decode GEMV prefetches its first rows of weights, and flash-decode its split's K/V rows,
    into L2 while the previous kernel runs: prefetch.global.L2 ahead of griddepcontrol.wait in the
    sm_90 PTX; LUCE_PREFETCH=0 compiles them out (and keys the cache apart)."""
    import re

    from luce_cuda import compile as cc
    from luce_cuda import programs

    def entry(prog, name: str) -> str:
        ptx = _ptx(cc.read_source(prog.source).encode(), 90, tuple(cc._defines(prog, 90)))
        m = re.search(r"\.entry " + name + r"\(", ptx)
        assert m, name
        nxt = ptx.find(".entry ", m.end())
        return ptx[m.end():nxt if nxt > 0 else len(ptx)]

    for prog, name in ((programs.GEMV["q4_0"], "gemv_q4_0_bf16"), (programs.ATTN_DECODE["f16"], "flash_decode_f16_d64")):
        body = entry(prog, name)
        assert "prefetch.global.L2" in body and body.index("prefetch.global.L2") < body.index("griddepcontrol.wait")
        on = cc.cache_key(prog, 90)
        monkeypatch.setenv("LUCE_PREFETCH", "0")
        assert cc.cache_key(prog, 90) != on
        assert "prefetch.global" not in entry(prog, name)
        monkeypatch.delenv("LUCE_PREFETCH")


def test_launch_refuses_python_scalars():
    pytest.importorskip("cuda.core", reason=NO_NVRTC or "cuda-core is not installed")
    from luce_cuda.launch import launch

    for bad in (3, 2.0, True):
        with pytest.raises(TypeError, match="numpy scalar"):
            launch(None, 1, 1, (bad,), like=None)  # type: ignore[arg-type]


def test_plugin_import_is_light():
    code = ("import sys, luce_cuda.plugin, luce_cuda.compile, luce_cuda.programs; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('cuda.', 'torch.'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _reasons(role: str, caps: Caps, config: RunConfig | None = None) -> dict[str, tuple[str, ...]]:
    from luce_cuda import plugin

    impls = plugin.provide_linear() if role == "linear" else plugin.provide_attention()
    return {c.impl.name: c.reasons for c in explain(role, impls, caps, config or RunConfig())}


GPU = dict(torch_cuda=True, nvrtc=(13, 0), nvrtc_archs=(75, 80, 86, 89, 90, 100, 120))


def test_requires_reasons():
    r = _reasons("linear", Caps())
    assert r["cuda"] == r["cuda-sm75"] == ("no NVIDIA GPU",) and "no NVIDIA GPU" in r["cuda-fp4tc"]
    no_nvrtc = Caps(torch_cuda=True).with_overrides({"cc": "9.0"})
    assert any("NVRTC not installed (pip install luce[cuda])" in r for r in _reasons("linear", no_nvrtc)["cuda"])
    no_torch = Caps(nvrtc=(13, 0)).with_overrides({"cc": "9.0"})
    assert any("torch has no CUDA" in r for r in _reasons("attention", no_torch)["cuda"])

    sm75 = Caps(**GPU).with_overrides("cc=7.5")
    r = _reasons("linear", sm75)
    assert "needs SM >= 8.0 (have 7.5)" in r["cuda"] and r["cuda-sm75"] == ()
    h100 = Caps(**GPU).with_overrides("cc=9.0")
    r = _reasons("linear", h100)
    assert r["cuda"] == () and r["cuda-sm75"] == ()
    cfg = RunConfig(weight_types={"Q4_1", "F32", "IQ2_XXS"})
    assert any("IQ2_XXS" in x for x in _reasons("linear", h100, cfg)["cuda"])


def test_attention_requires_reasons():
    h100 = Caps(**GPU).with_overrides("cc=9.0")
    assert _reasons("attention", h100)["cuda"] == ()
    # every KV format luce stores is read by the decode kernel, K and V independently
    for k, v in (("q8_0", "q4_0"), ("q4_0", "f16"), ("f32", "f32"), ("bf16", "q8_0")):
        assert _reasons("attention", h100, RunConfig(kv_k=k, kv_v=v))["cuda"] == (), (k, v)
    sm75 = Caps(**GPU).with_overrides("cc=7.5")
    assert _reasons("attention", sm75)["cuda"] == ()  # FP16 mma.sync from SM 7.5
    assert _reasons("attention", sm75, RunConfig(kv_k="bf16", kv_v="bf16"))["cuda"] == ()
    sm70 = Caps(**GPU).with_overrides("cc=7.0")
    assert "needs SM >= 7.5 (have 7.0)" in _reasons("attention", sm70)["cuda"]
    m = ModelConfig("llama", 2, 256, 512, 4, 2, 96, 100, 128)
    assert any("head_dim 96" in r for r in _reasons("attention", h100, RunConfig(model=m))["cuda"])


def test_numpy_scalar_types_used_in_launches():
    """Every launch site passes numpy scalars: a Python int would be packed as 8 bytes."""
    import ast
    from pathlib import Path

    import luce_cuda

    root = Path(luce_cuda.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "launch":
                args = node.args[3] if len(node.args) > 3 else None
                assert isinstance(args, ast.Tuple), f"{path.name}:{node.lineno}: launch args must be a literal tuple"
                for a in args.elts:
                    assert not isinstance(a, ast.Constant) or a.value is None, \
                        f"{path.name}:{node.lineno}: literal scalar {ast.dump(a)} passed to a kernel"
    assert np.int32(1).nbytes == 4  # the C int the kernels declare


def test_launch_packs_tensors_none_and_numpy_scalars(monkeypatch):
    """Each argument as cuda.core takes it: a tensor (or a subclass) its data pointer, None a null
    pointer, a numpy scalar unchanged (its exact C type), in order."""
    cuda_core = pytest.importorskip("cuda.core", reason=NO_NVRTC or "cuda-core is not installed")
    import torch

    from luce_cuda import launch as L

    calls = []
    monkeypatch.setattr(cuda_core, "launch", lambda *a: calls.append(a))
    monkeypatch.setattr(cuda_core, "LaunchConfig", lambda **kw: kw)
    monkeypatch.setattr(L, "_stream", lambda index: "stream")
    monkeypatch.setattr(L, "device_index", lambda like: 0)
    monkeypatch.setattr(L, "pdl_enabled", lambda index: False)
    monkeypatch.setattr(L, "_configs", {})
    x, p = torch.arange(4.0), torch.nn.Parameter(torch.zeros(2))
    args = (x, None, np.int32(3), np.int64(-2), np.float32(1.5), p, np.uint8(7), np.float64(0.25))
    L.launch("kernel", (2, 1), 32, args, like=x)
    (stream, cfg, kernel, *packed), = calls
    assert (stream, kernel, cfg["grid"], cfg["block"]) == ("stream", "kernel", (2, 1), 32)
    assert packed == [x.data_ptr(), 0, 3, -2, 1.5, p.data_ptr(), 7, 0.25]
    assert [type(a) for a in packed[2:5]] == [np.int32, np.int64, np.float32]

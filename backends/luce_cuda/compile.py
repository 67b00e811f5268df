"""NVRTC compile service: kernel sources (.cu beside this file) -> CUBIN for one exact arch.

* Headers come from pip wheels found by ``cuda.pathfinder`` (cudart, cccl and the crt/ headers
  that ``mma.h`` needs), or from NVRTC itself when it bundles them (NVRTC >= 13.3).
* Compiled cubins are cached on disk under ``luce_core.default_model.cache_dir()/"cubin"``, keyed by the
  source (and the project headers it may include), the options, a digest of the CUDA headers,
  the NVRTC and cuda-core versions and, when a driver is present, its version.
* A failed compile raises :class:`KernelCompileError` (a LuceError) with the NVRTC log.

Nothing here imports CUDA at module import time; ``cuda.core`` is imported on first compile.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import attrs

from luce_core.plugin_api import KernelError

KERNEL_DIR = Path(__file__).parent / "kernels"
# Bump when the meaning of a cache entry changes (key layout, options policy).
CACHE_FORMAT = "luce-cubin-1"
INSTALL_HINT = ("pip install 'luce[cuda]' (cuda-core, cuda-pathfinder and cuda-toolkit[nvrtc,cudart,crt,cccl] "
                "pinned to your driver's CUDA)")
# CUDA headers whose content changes what a kernel compiles to.
_DIGEST_HEADERS = ("cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp", "mma.h",
                   "crt/mma.h", "crt/mma.hpp", "cuda_runtime_api.h", "nv/target")


class KernelCompileError(KernelError):
    """NVRTC rejected a kernel source, or the CUDA compile toolchain is missing."""


@attrs.frozen
class KernelProgram:
    """One compilation unit: a .cu file plus macro definitions, valid from ``min_sm`` on.

    ``kernels`` lists the extern "C" entry points the unit defines (checked by the tests)."""

    name: str
    source: str  # file name inside kernels/
    kernels: tuple[str, ...]
    defines: tuple[tuple[str, str], ...] = ()
    min_sm: int = 75
    needs_mma_h: bool = False  # WMMA code needs crt/mma.h from the crt wheel
    code: str | None = None  # source text instead of the file (tests, third-party kernels)
    # every kernel calls grid_dependency_sync() (luce_common.cuh) before touching global memory,
    # so luce_cuda.launch may launch it with programmatic stream serialization on SM 9.0+
    pdl: bool = False

    def supports(self, sm: int) -> bool:
        return sm >= self.min_sm


# ----------------------------------------------------------------------------- toolchain facts
@functools.lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise KernelCompileError(f"NVRTC is not installed ({e})", remedy=INSTALL_HINT) from None
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # the bindings are there but libnvrtc is not
        raise KernelCompileError(f"NVRTC cannot be loaded ({e})", remedy=INSTALL_HINT) from None
    if int(err) != 0:
        raise KernelCompileError(f"nvrtcVersion failed ({err})", remedy=INSTALL_HINT)
    return int(major), int(minor)


@functools.lru_cache(maxsize=1)
def supported_archs() -> tuple[int, ...]:
    from cuda.bindings import nvrtc

    err, archs = nvrtc.nvrtcGetSupportedArchs()
    return tuple(int(a) for a in archs) if int(err) == 0 else ()


@functools.lru_cache(maxsize=1)
def driver_version() -> int | None:
    """The CUDA driver's version number (e.g. 13000), or None without a driver."""
    try:
        from cuda.bindings import driver

        err, v = driver.cuDriverGetVersion()
        return int(v) if int(err) == 0 else None
    except Exception:
        return None


def _bundled_headers() -> bool:
    return nvrtc_version() >= (13, 3)


@functools.lru_cache(maxsize=1)
def include_dirs() -> tuple[str, ...]:
    """CUDA header directories for NVRTC (empty when NVRTC bundles its own headers)."""
    if _bundled_headers():
        return ()
    try:
        import cuda.pathfinder as pf
    except ImportError as e:
        raise KernelCompileError(f"cuda-pathfinder is not installed ({e})", remedy=INSTALL_HINT) from None
    dirs: list[str] = []
    for lib in ("cudart", "cccl"):
        try:
            d = pf.find_nvidia_header_directory(lib)
        except Exception:
            d = None
        if d:
            dirs.append(str(d))
    if not any((Path(d) / "cuda_fp16.h").exists() for d in dirs):
        raise KernelCompileError("CUDA runtime headers (cuda_fp16.h) not found by cuda.pathfinder",
                                 remedy=INSTALL_HINT)
    if not any((Path(d) / "nv" / "target").exists() for d in dirs):
        raise KernelCompileError("CCCL headers (nv/target) not found by cuda.pathfinder", remedy=INSTALL_HINT)
    return tuple(dict.fromkeys(dirs))


def _has_crt_mma(dirs: Sequence[str]) -> bool:
    return _bundled_headers() or any((Path(d) / "crt" / "mma.h").exists() for d in dirs)


@functools.lru_cache(maxsize=1)
def header_digest() -> str:
    h = hashlib.sha256()
    if _bundled_headers():
        h.update(b"bundled")
    for d in include_dirs():
        h.update(d.encode())
        for name in _DIGEST_HEADERS:
            p = Path(d) / name
            if p.is_file():  # nv/target is a file in CCCL
                h.update(name.encode() + p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- sources
def read_source(file: str) -> str:
    path = KERNEL_DIR / file
    try:
        return path.read_text()
    except OSError as e:
        raise KernelCompileError(f"kernel source {path} cannot be read ({e})",
                                 remedy="reinstall luce: the package data is incomplete") from None


@functools.lru_cache(maxsize=None)
def _project_headers_digest() -> str:
    # Sources include our own .cuh headers; any change to one must miss the cache.
    h = hashlib.sha256()
    for p in sorted(KERNEL_DIR.glob("*.cuh")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _defines(prog: KernelProgram, sm: int) -> list[tuple[str, str]]:
    out = [*prog.defines, ("LUCE_SM", str(sm))]
    if os.environ.get("LUCE_PREFETCH") == "0":  # A/B switch for the prefetch before the PDL wait
        out.append(("LUCE_PREFETCH", "0"))
    return out


def _options(prog: KernelProgram, sm: int, target: str) -> Any:
    from cuda.core import ProgramOptions

    dirs = list(include_dirs())
    if prog.needs_mma_h and not _has_crt_mma(dirs):
        raise KernelCompileError(
            f"kernel program {prog.name!r} needs crt/mma.h, which the installed CUDA headers lack",
            remedy="pip install 'cuda-toolkit[crt]' matching your NVRTC version (part of luce[cuda])")
    arch = f"sm_{sm}" if target == "cubin" else f"compute_{sm}"
    return ProgramOptions(
        name=prog.source, arch=arch, std="c++17", include_path=[str(KERNEL_DIR), *dirs],
        define_macro=_defines(prog, sm),
        use_bundled_headers=True if _bundled_headers() else None,
    )


def _options_text(prog: KernelProgram, sm: int, target: str) -> str:
    # A deterministic rendering of everything that changes the compile output.
    return repr((prog.source, sorted(_defines(prog, sm)), target, "c++17", prog.needs_mma_h))


def cache_key(prog: KernelProgram, sm: int, target: str = "cubin") -> str:
    import importlib.metadata

    h = hashlib.sha256()
    source = prog.code if prog.code is not None else read_source(prog.source)
    for part in (CACHE_FORMAT, source, _project_headers_digest(),
                 _options_text(prog, sm, target), header_digest(), repr(nvrtc_version()),
                 importlib.metadata.version("cuda-core"), repr(driver_version())):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_root() -> Path:
    from luce_core.plugin_api import cache_dir

    return cache_dir() / "cubin"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers never see a half-written cubin
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compile_program(prog: KernelProgram, sm: int, target: str = "cubin", *, use_cache: bool = True) -> bytes:
    """Compile ``prog`` for ``sm`` (75, 80, 90, ...) to CUBIN (or PTX) bytes, via the disk cache."""
    if not prog.supports(sm):
        raise KernelCompileError(f"kernel program {prog.name!r} needs SM >= {prog.min_sm / 10:.1f}, asked for sm_{sm}")
    key = cache_key(prog, sm, target)
    path = cache_root() / f"{prog.name}-{target}-sm{sm}-{key[:32]}.{target}"
    if use_cache and path.is_file():
        data = path.read_bytes()
        if data:
            return data
    program = _program_class()
    source = prog.code if prog.code is not None else read_source(prog.source)
    opts = _options(prog, sm, target)
    try:
        obj = program(source, "c++", options=opts).compile(target)  # NVRTC is thread-safe
    except Exception as e:  # NVRTCError carries the log; anything else here is a compile failure too
        raise KernelCompileError(
            f"NVRTC failed to compile kernel program {prog.name!r} ({prog.source}, kernels "
            f"{', '.join(prog.kernels)}) for sm_{sm}:\n{e}",
            remedy="this is a bug in luce's kernel or a header/NVRTC version mismatch; report it, "
                   "or force the torch implementation (e.g. LUCE_LINEAR=torch)") from None
    data = bytes(obj.code)
    if use_cache:
        try:
            _write_atomic(path, data)
        except OSError:
            pass  # a read-only cache only costs a recompile next time
    return data


_import_lock = threading.Lock()


def _program_class() -> Any:
    try:
        with _import_lock:  # a first import of cuda.core from two threads at once can fail
            from cuda.core import Program
    except ImportError as e:
        raise KernelCompileError(f"cuda-core is not installed ({e})", remedy=INSTALL_HINT) from None
    return Program


def target_for_device(sm: int) -> tuple[int, str]:
    """(arch, target) to build for a device of ``sm``: its own cubin when NVRTC can target it,
    else PTX of the newest older arch NVRTC knows (the driver JITs it)."""
    archs = supported_archs()
    if not archs or sm in archs:
        return sm, "cubin"
    older = [a for a in archs if a <= sm]
    if not older:
        raise KernelCompileError(f"NVRTC {nvrtc_version()} cannot target sm_{sm} or any older arch",
                                 remedy=INSTALL_HINT)
    return max(older), "ptx"

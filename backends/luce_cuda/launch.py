"""Load compiled kernels and launch them on the current torch stream.

* Kernels run in torch's (primary) context, on ``torch.cuda.current_stream()`` wrapped by
  ``Device.create_stream`` (no ownership taken), so they order with torch work and are captured
  by ``torch.cuda.graph``.
* Scalars must be numpy scalars of the exact C type (``np.int32``, ``np.float32``,
  ``np.int64``): cuda.core packs a Python int as 8 bytes, which silently corrupts an ``int``
  parameter. :func:`launch` refuses plain Python numbers.
* Modules are loaded once per (program, device) by :func:`get_kernel`; get every kernel (the
  ``warmup`` of luce_cuda.linear / luce_cuda.ops does) before any CUDA-graph capture so no
  module load happens while capturing.
* Kernels of a program marked ``pdl`` are launched with programmatic stream serialization on
  SM 9.0+ (programmatic dependent launch): the next kernel's blocks are dispatched while the
  current one finishes and wait in ``grid_dependency_sync()``, which hides most of the launch
  gap between the small kernels of a decode step, in CUDA graphs too. ``LUCE_PDL=0`` turns it off.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from luce_cuda.compile import KernelCompileError, KernelProgram, compile_program, target_for_device

if TYPE_CHECKING:
    import torch

_lock = threading.Lock()
_modules: dict[tuple[str, int, int], Any] = {}
_kernels: dict[tuple[str, int, int, str], Any] = {}
_streams: dict[tuple[int, int], Any] = {}
_devices: dict[int, Any] = {}
_pdl_kernels: set[int] = set()  # id() of kernels whose program waits in grid_dependency_sync()
_pdl_devices: dict[int, bool] = {}


def _device(index: int) -> Any:
    dev = _devices.get(index)
    if dev is None:
        import torch
        from cuda.core import Device

        torch.cuda.init()  # torch owns the primary context; cuda.core shares it
        dev = Device(index)
        dev.set_current()
        _devices[index] = dev
    return dev


def device_sm(index: int = 0) -> int:
    """The real compute capability of CUDA device ``index`` as one number (9.0 -> 90)."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _module(prog: KernelProgram, index: int) -> Any:
    key = (prog.name, hash(prog), index)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            from cuda.core import ObjectCode

            dev = _device(index)
            sm = device_sm(index)
            # Variant choice (e.g. the SM75 path) is the caller's; the binary is always built for
            # the device it runs on, because an sm_75 cubin does not load on sm_90.
            arch, target = target_for_device(sm)
            code = compile_program(prog, arch, target)
            dev.set_current()
            mod = ObjectCode.from_cubin(code, name=prog.name) if target == "cubin" \
                else ObjectCode.from_ptx(code, name=prog.name)
            _modules[key] = mod
    return mod


def get_kernel(prog: KernelProgram, name: str, index: int = 0) -> Any:
    key = (prog.name, hash(prog), index, name)
    k = _kernels.get(key)
    if k is None:
        if name not in prog.kernels:
            raise KernelCompileError(f"kernel {name!r} is not declared by program {prog.name!r}")
        try:
            k = _module(prog, index).get_kernel(name)
        except KernelCompileError:
            raise
        except Exception as e:
            raise KernelCompileError(
                f"loading kernel {name!r} of {prog.name!r} failed: {e}",
                remedy="force the torch implementation (e.g. LUCE_LINEAR=torch) and report it") from e
        _kernels[key] = k
        if prog.pdl:
            _pdl_kernels.add(id(k))
    return k


def pdl_enabled(index: int = 0) -> bool:
    """Whether kernels that support it are launched with programmatic dependent launch here."""
    on = _pdl_devices.get(index)
    if on is None:
        on = _pdl_devices[index] = device_sm(index) >= 90 and os.environ.get("LUCE_PDL", "1") != "0"
    return on


def device_index(x: "torch.Tensor | torch.device | str | int") -> int:
    """CUDA device ordinal of a tensor or device; a bare "cuda" means torch's current device."""
    import torch

    if isinstance(x, int):
        return x
    d = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    return d.index if d.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=1)
def _current_raw_stream() -> Any:
    """index -> torch's current stream handle on that device, as a plain int (no Stream object
    where torch offers it)."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw if raw is not None else (lambda index: torch.cuda.current_stream(index).cuda_stream)


def _stream(index: int) -> Any:
    key = (index, int(_current_raw_stream()(index)))
    s = _streams.get(key)
    if s is None:

        class _TorchStream:  # __cuda_stream__ protocol: (version, handle)
            def __init__(self, handle: int):
                self.handle = handle

            def __cuda_stream__(self) -> tuple[int, int]:
                return (0, self.handle)

        s = _device(index).create_stream(_TorchStream(key[1]))
        _streams[key] = s
    return s


def stream_for(t: "torch.Tensor") -> Any:
    """cuda.core Stream wrapping torch's current stream on ``t``'s device (cached by handle)."""
    return _stream(device_index(t))


_ALLOWED = (np.integer, np.floating)
# the numpy scalar types the kernels take, matched by exact type first: one set lookup per
# argument (a 33-argument GEMV packed in 4.9 instead of 14.7 us on a 2-core CI machine)
_SCALARS = frozenset((np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
                      np.float16, np.float32, np.float64))


_configs: dict[tuple[Any, ...], Any] = {}  # LaunchConfig per (grid, block, shmem, pdl): built once


def launch(kernel: Any, grid: tuple[int, ...] | int, block: tuple[int, ...] | int, args: tuple[Any, ...],
           like: "torch.Tensor", shmem: int = 0) -> None:
    """Launch ``kernel`` with ``args`` on the current torch stream of ``like``'s device.

    Tensors are passed as their data pointers; scalars must be numpy scalars (exact C type).
    This runs once per kernel of every eager forward (prefill is host-bound on small models), so
    it keeps its per-call work to the argument list."""
    import torch
    from cuda.core import LaunchConfig
    from cuda.core import launch as cu_launch

    tensor = torch.Tensor
    packed: list[Any] = []
    for a in args:
        t = type(a)
        if t in _SCALARS:
            packed.append(a)
        elif t is tensor or isinstance(a, tensor):
            packed.append(a.data_ptr())
        elif a is None:
            packed.append(0)  # a null pointer
        elif isinstance(a, _ALLOWED):
            packed.append(a)
        else:
            raise TypeError(f"kernel argument {a!r} must be a tensor, None or a numpy scalar of the exact C type")
    index = device_index(like)
    pdl = id(kernel) in _pdl_kernels and pdl_enabled(index)
    key = (grid, block, shmem, pdl)
    cfg = _configs.get(key)
    if cfg is None:
        cfg = _configs[key] = LaunchConfig(grid=grid, block=block, shmem_size=shmem,
                                           programmatic_stream_serialization=pdl)
    cu_launch(_stream(index), cfg, kernel, *packed)

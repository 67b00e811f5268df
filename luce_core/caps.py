"""What this machine can do: a frozen, hashable capability set and its probe.

The probe creates no CUDA context and works with no GPU, no driver and no CUDA library: GPU
facts come from NVML (via ctypes) and the CUDA driver's device attributes (``cuInit`` does not
create a context), NVRTC facts from ``cuda.bindings.nvrtc`` when installed.

Override (tests, or to run e.g. the SM 7.5 path on a newer GPU): ``LUCE_CAPS`` or ``--caps``
take ``field=value`` pairs separated by commas, e.g. ``LUCE_CAPS="cc=7.5"`` or
``--caps "device=cpu"``. Tensor-core flags follow a forced ``cc`` unless set explicitly.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
from typing import Any

import attrs

from luce_core.contract.errors import ConfigError


def _cc(value: Any) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        major, _, minor = value.replace("sm_", "").partition(".")
        if not minor and len(major) >= 2:  # "75" / "sm_90"
            major, minor = major[:-1], major[-1]
        return int(major), int(minor or 0)
    return int(value[0]), int(value[1])


def tensor_core_flags(cc: tuple[int, int] | None) -> dict[str, bool]:
    """Which tensor-core dtypes a compute capability has (FP16 from Volta/Turing, BF16 from
    Ampere, FP8 from Ada, FP4 on Blackwell datacenter (10.x) and consumer (12.x) parts)."""
    if cc is None:
        return dict(fp16_tc=False, bf16_tc=False, fp8_tc=False, fp4_tc=False)
    v = cc[0] * 10 + cc[1]
    return dict(fp16_tc=v >= 70, bf16_tc=v >= 80, fp8_tc=v >= 89, fp4_tc=cc[0] in (10, 12))


@attrs.frozen
class Caps:
    device: str = "cpu"  # "cpu" or "cuda": the best device torch can compute on here
    gpu_name: str = ""
    cc: tuple[int, int] | None = attrs.field(default=None, converter=_cc)
    sm_count: int = 0
    gpu_memory: int = 0  # bytes
    fp16_tc: bool = False
    bf16_tc: bool = False
    fp8_tc: bool = False
    fp4_tc: bool = False
    driver_cuda: tuple[int, int] | None = attrs.field(default=None, converter=_cc)
    nvrtc: tuple[int, int] | None = attrs.field(default=None, converter=_cc)
    nvrtc_archs: tuple[int, ...] = attrs.field(default=(), converter=lambda a: tuple(int(x) for x in a))
    torch_cuda: bool = False  # torch was built with CUDA and sees a device
    cpu_name: str = ""
    cpu_flags: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    overridden: tuple[str, ...] = ()

    @property
    def sm(self) -> int:
        """Compute capability as one number (7.5 -> 75); 0 without a GPU."""
        return self.cc[0] * 10 + self.cc[1] if self.cc else 0

    @property
    def arch(self) -> str:
        return f"sm_{self.sm}" if self.cc else ""

    def with_overrides(self, spec: str | dict[str, Any]) -> "Caps":
        """A copy with fields forced (see module docstring for the syntax)."""
        items = parse_override(spec) if isinstance(spec, str) else dict(spec)
        fields = attrs.fields_dict(Caps)
        unknown = sorted(set(items) - set(fields) - {"overridden"})
        if unknown:
            raise ConfigError(f"unknown capability field(s) {', '.join(unknown)}",
                              remedy=f"known fields: {', '.join(f for f in fields if f != 'overridden')}")
        given = set(items)  # what the user forced (derived flags are not listed as overridden)
        try:  # a malformed value is the user's error: ConfigError, never a bare ValueError
            if "cc" in items:  # derived flags follow the forced compute capability
                items = {**tensor_core_flags(_cc(items["cc"])), **items}
            for k, v in list(items.items()):
                t = fields[k].type
                if t in (bool, "bool") and isinstance(v, str):
                    items[k] = _flag(v)
                elif t in (int, "int") and isinstance(v, str):
                    items[k] = int(float(v))
                elif k in ("cpu_flags", "nvrtc_archs") and isinstance(v, str):
                    items[k] = [x for x in v.replace("+", " ").split() if x]
            device = items.get("device", self.device)
            if device not in ("cpu", "cuda"):
                raise ValueError(f"device must be cpu or cuda, got {device!r}")
            return attrs.evolve(self, **items, overridden=tuple(sorted(set(self.overridden) | given)))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"capability override {spec!r} has an invalid value: {e}",
                              remedy='write e.g. LUCE_CAPS="cc=7.5,sm_count=68,bf16_tc=0"') from None

    def summary(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["cpu_flags"] = sorted(self.cpu_flags)
        return d


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (1/0, true/false, yes/no, on/off)")


def parse_override(spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"capability override {part!r} is not field=value",
                              remedy='write e.g. LUCE_CAPS="cc=7.5,sm_count=68"')
        out[key.strip()] = value.strip()
    return out


def _cpu() -> tuple[str, frozenset[str]]:
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and ":" in line:
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return name, flags


def _nvml_gpu() -> dict[str, Any]:
    """GPU 0 via NVML; {} when there is no NVIDIA driver. Creates no CUDA context."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return {}
    if nvml.nvmlInit_v2() != 0:
        return {}
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value == 0:
            return {}
        handle = ctypes.c_void_p()
        nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle))
        name = ctypes.create_string_buffer(96)
        nvml.nvmlDeviceGetName(handle, name, 96)
        major, minor = ctypes.c_int(), ctypes.c_int()
        nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor))

        class Mem(ctypes.Structure):
            _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]
        mem = Mem()
        nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem))
        drv = ctypes.c_int()
        nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(drv))
        return dict(gpu_name=name.value.decode(errors="replace"), cc=(major.value, minor.value),
                    gpu_memory=int(mem.total), driver_cuda=(drv.value // 1000, drv.value % 1000 // 10))
    finally:
        nvml.nvmlShutdown()


def _sm_count() -> int:
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        return 0
    try:
        (err,) = cu.cuInit(0)
        if int(err) != 0:
            return 0
        err, n = cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 0)
        return int(n) if int(err) == 0 else 0
    except Exception:
        return 0


def nvrtc_info() -> tuple[tuple[int, int] | None, tuple[int, ...]]:
    """(NVRTC version, supported SM numbers), or (None, ()) when NVRTC is not installed."""
    try:
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
        if int(err) != 0:
            return None, ()
        err, archs = nvrtc.nvrtcGetSupportedArchs()
        return (major, minor), tuple(int(a) for a in archs) if int(err) == 0 else ()
    except Exception:  # ImportError, or the wheel is there but libnvrtc is not
        return None, ()


def _torch_cuda() -> bool:
    try:
        import torch
        return bool(torch.version.cuda) and torch.cuda.is_available()
    except Exception:
        return False


@functools.lru_cache(maxsize=1)
def _probe_machine() -> Caps:
    cpu_name, cpu_flags = _cpu()
    gpu = _nvml_gpu()
    nv, archs = nvrtc_info()
    torch_cuda = _torch_cuda() if gpu else False
    fields: dict[str, Any] = dict(cpu_name=cpu_name, cpu_flags=cpu_flags, nvrtc=nv, nvrtc_archs=archs)
    if gpu:
        fields.update(gpu, sm_count=_sm_count(), torch_cuda=torch_cuda,
                      device="cuda" if torch_cuda else "cpu", **tensor_core_flags(gpu["cc"]))
    return Caps(**fields)


def probe(override: str | None = None) -> Caps:
    """This machine's capabilities, with ``override`` (or env LUCE_CAPS) applied on top."""
    caps = _probe_machine()
    spec = override if override is not None else os.environ.get("LUCE_CAPS", "")
    return caps.with_overrides(spec) if spec else caps

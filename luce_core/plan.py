"""Planning: probe, select one implementation per role, load, size and build everything once."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable

import attrs

from luce_core import plugin_host, selection
from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.contract.errors import (ConfigError, DeviceMemoryError, KernelError, LuceError, ModelFileError,
                                       PluginError, SelectionError)
from luce_core.contract.impl import Impl
from luce_core.contract.roles import optional
from luce_core.contract.types import KVSpec, LoadedModel, ModelConfig
from luce_core.formats.blocks import kv_bytes_per_token

REFERENCE_PLUGIN = "torch"


def resolve_device(config: RunConfig, caps: Caps) -> str:
    if config.device == "auto":
        return caps.device
    if config.device.startswith("cuda") and not caps.torch_cuda:
        raise ConfigError(f"--device {config.device} asked for, but torch sees no CUDA device here",
                          remedy="use --device cpu, or install a CUDA build of torch on a GPU machine")
    if config.device not in ("cpu", "cuda") and not config.device.startswith("cuda:"):
        raise ConfigError(f"unknown device {config.device!r}", remedy="use auto, cpu or cuda")
    return config.device


def resolve_dtype(config: RunConfig, caps: Caps, device: str) -> str:
    if config.dtype != "auto":
        if config.dtype == "bf16" and device.startswith("cuda") and not caps.bf16_tc:
            raise ConfigError(f"bf16 compute asked for, but {caps.gpu_name or 'this GPU'} (SM {caps.sm}) has no BF16 tensor cores",
                              remedy="use --dtype f16")
        return config.dtype
    if device.startswith("cuda"):
        return "bf16" if caps.bf16_tc else "f16"
    return "f32"


class Chooser:
    """Per-role selection with the first-use fallback the design asks for."""

    def __init__(self, caps: Caps, config: RunConfig):
        self.caps, self.config = caps, config
        self.failed: dict[str, list[str]] = {}
        self.chosen: dict[str, Impl] = {}

    def impls(self, role: str) -> list[Impl]:
        return plugin_host.host().impls(role)

    def create(self, role: str, config: RunConfig | None = None) -> tuple[Impl, Any]:
        """The role's object; attention is paired with the kv_storage chosen before it."""
        config = config or self.config
        while True:
            impl = selection.select(role, self.impls(role), self.caps, config, self.failed.get(role, ()),
                                    kv_storage=self.chosen.get("kv_storage"))
            try:
                obj = impl.create(self.caps, config)
            except LuceError as e:
                if not isinstance(e, KernelError):
                    raise
                self.fail(role, impl, e)
                continue
            except Exception as e:
                self.fail(role, impl, e)
                continue
            self.chosen[role] = impl
            return impl, obj

    def fail(self, role: str, impl: Impl, err: BaseException) -> None:
        """Record a first-use failure; re-raise when the user forced this implementation."""
        if selection.forced_name(role, self.config) == impl.name:
            raise LuceError(f"{role} implementation {impl.name!r} (forced) failed: {type(err).__name__}: {err}",
                            remedy=f"drop --{role.replace('_', '-')} to let luce fall back") from err
        warnings.warn(f"luce: {role} implementation {impl.name!r} failed ({type(err).__name__}: {err}); "
                      f"falling back to the next candidate", stacklevel=3)
        self.failed.setdefault(role, []).append(impl.name)


@attrs.define
class Plan:
    caps: Caps
    config: RunConfig
    device: str
    dtype: str
    ctx: int
    loaded: LoadedModel
    model: Any  # luce_core.model.Transformer
    kv: Any  # KVStore
    chosen: dict[str, Impl]

    @property
    def graphs(self) -> bool:
        """Whether decode replays CUDA graphs (see ``decode_graphs``)."""
        return decode_graphs(self.config, self.device, self.kv)


def decode_graphs(config: RunConfig, device: str, kv: Any) -> bool:
    """Whether decode replays CUDA graphs: asked for, on a GPU, and the store can write at
    device-side slots (the optional ``KVStore.write_at``; ``eager_decode_reason`` says so)."""
    return config.cuda_graphs and device.startswith("cuda") and optional(kv, "kv_store", "write_at") is not None


def _progress_wrapper(enabled: bool, desc: str):
    def wrap(it):
        from tqdm import tqdm
        return tqdm(it, desc=desc, disable=not enabled, leave=False, file=sys.stderr, unit="layer")
    return wrap


def free_memory(device: str) -> int | None:
    """Bytes that can be allocated on ``device`` now: free GPU memory, or the kernel's
    MemAvailable estimate of RAM (None where the platform does not say)."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_free_memory(kv_need: int, ctx: int, m: ModelConfig, device: str, config: RunConfig) -> None:
    """Refuse a context whose KV cache and RoPE tables alone do not fit in the free memory, before
    allocating either (a huge --ctx is a clear error, not an allocation traceback or a swap storm)."""
    rope_need = 2 * ctx * ((m.rope_dim or m.head_dim) // 2) * 4  # cos and sin tables, float32 (Transformer)
    need, free = kv_need + rope_need, free_memory(device)
    if free is not None and need > free:
        where = "GPU memory" if device.startswith("cuda") else "RAM"
        raise DeviceMemoryError(
            f"a context of {ctx} tokens needs {need} bytes ({_size(need)}: KV cache {config.kv_k}/{config.kv_v} "
            f"and RoPE tables), but only {free} bytes ({_size(free)}) of {where} are free",
            remedy="lower --ctx, or store the cache quantized (--kv-k q8_0 --kv-v q8_0, or q4_0)")


def build(config: RunConfig, caps: Caps, on_loaded: Callable[[LoadedModel, int], None] | None = None) -> Plan:
    """The plan of a run. ``on_loaded(loaded, ctx)`` is called once the model file is parsed and
    the context length known, before any weight is prepared: a check that raises there (a prompt
    too long for the context) costs no load time."""
    import torch

    from luce_core.model import Transformer
    from luce_core.formats.dtypes import TORCH_DTYPES  # dtype names -> torch dtypes (reference vocabulary)

    if not os.path.exists(config.model_path):
        raise ModelFileError(f"model file not found: {config.model_path}",
                             remedy="check the path, or leave out --model to use the embedded default model")
    ch = Chooser(caps, config)
    try:
        _, loader = ch.create("loader")
    except SelectionError:  # a loader's reasons are its claim on the file: no loader reads it
        if selection.forced_name("loader", config) is not None:
            raise
        why = "; ".join(f"{c.impl.name}: {', '.join(c.reasons)}"
                        for c in selection.explain("loader", ch.impls("loader"), caps, config))
        raise ModelFileError(f"{config.model_path} is not a model file luce can read ({why})",
                             remedy="pass a GGUF model file (--model PATH.gguf)") from None
    loaded: LoadedModel = loader.load(config.model_path, config)
    ctx = config.ctx or min(loaded.config.ctx_train, 4096)
    if ctx < 2:
        raise ConfigError(f"context length {ctx} is too small", remedy="use --ctx 2 or more")
    if on_loaded is not None:  # the file is parsed, no weight is prepared yet: cheap checks fail fast here
        on_loaded(loaded, ctx)
    if config.weights == "nvfp4":  # before selection: linear implementations see the NVFP4 types
        from luce_core.formats.repack import repack_nvfp4
        loaded = repack_nvfp4(loaded, progress=config.progress)
    types = {t.qtype for t in loaded.tensors.values()}
    config = config.with_model(loaded.config, types)
    ch.config = config
    device = resolve_device(config, caps)
    dtype = resolve_dtype(config, caps, device)
    m = loaded.config
    kv_need = kv_bytes_per_token(m.n_layers, m.n_kv_heads, m.head_dim, config.kv_k, config.kv_v) * ctx
    check_free_memory(kv_need, ctx, m, device, config)
    tdev, tdtype = torch.device(device), TORCH_DTYPES[dtype]

    # the store first: which attention implementations can read it depends on its layout
    _, kv_storage = ch.create("kv_storage", config)
    while True:
        linear_impl, linear = ch.create("linear", config)
        attn_impl, attention = ch.create("attention", config)
        try:
            model = Transformer(loaded, linear, attention, tdev, tdtype, max_positions=ctx,
                                progress=_progress_wrapper(config.progress, "preparing weights"))
            break
        except torch.cuda.OutOfMemoryError:
            need = sum(t.nbytes for t in loaded.tensors.values())
            free = torch.cuda.mem_get_info(tdev)[0]
            raise DeviceMemoryError(
                f"out of GPU memory while loading the weights ({need / 2**30:.2f} GiB stored in the file; "
                f"{free / 2**30:.2f} GiB free now)",
                remedy="free GPU memory (other processes), use a smaller or more quantized GGUF, "
                       "or run on the CPU with --device cpu") from None
        except Exception as e:  # a kernel that fails at first use falls back (unless forced)
            if isinstance(e, LuceError) and not isinstance(e, KernelError):
                raise
            culprits = [(r, i) for r, i in (("linear", linear_impl), ("attention", attn_impl))
                        if i.plugin != REFERENCE_PLUGIN]
            if not culprits:
                raise
            for role, impl in culprits:
                ch.fail(role, impl, e)

    spec = KVSpec(n_layers=loaded.config.n_layers, n_kv_heads=loaded.config.n_kv_heads,
                  head_dim=loaded.config.head_dim, capacity=ctx, k_dtype=config.kv_k, v_dtype=config.kv_v,
                  rotation=config.kv_rotation, device=device, compute_dtype=dtype, fingerprint=loaded.fingerprint)
    try:
        kv = kv_storage.allocate(spec)
    except torch.cuda.OutOfMemoryError:
        free = torch.cuda.mem_get_info(tdev)[0]
        raise DeviceMemoryError(
            f"the KV cache needs {kv_need / 2**30:.2f} GiB for a context of {ctx} tokens, but only "
            f"{free / 2**30:.2f} GiB of GPU memory is free",
            remedy="lower --ctx, or store the cache quantized (--kv-k q8_0 --kv-v q8_0, or q4_0)") from None
    kv_impl = ch.chosen["kv_storage"]
    if kv_impl.kv_layout and optional(kv, "kv_store", "tensors") is None:
        raise PluginError(f"kv_storage {kv_impl.name!r} declares the KV layout {kv_impl.kv_layout} but its "
                          f"store {type(kv).__name__} provides no `tensors`",
                          remedy="report it to the plugin's authors; meanwhile use --kv-storage torch")
    note = eager_decode_reason(config, device, kv_impl, kv)
    if note:
        warnings.warn(f"luce: {note}", stacklevel=2)
    return Plan(caps, config, device, dtype, ctx, loaded, model, kv, dict(ch.chosen))


def eager_decode_reason(config: RunConfig, device: str, kv_impl: Impl, kv: Any) -> str | None:
    """Why decode will run without CUDA graphs although they were asked for, when the cause is
    the chosen KV store (it lacks the optional ``write_at`` a graph replay needs), else None."""
    if not (config.cuda_graphs and device.startswith("cuda")) or decode_graphs(config, device, kv):
        return None
    return (f"kv_storage {kv_impl.name!r} has no write_at, so decode runs without CUDA graphs "
            f"(slower); a store implementing KVStore.write_at gets them")

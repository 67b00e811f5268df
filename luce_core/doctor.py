"""``luce doctor``: what was probed, and why each role's implementation was (or was not) chosen
(attention: also whether it can read the chosen kv_storage's layout)."""
from __future__ import annotations

import json
from typing import Any

import attrs

from luce_core import plugin_host, selection
from luce_core.caps import probe
from luce_core.config import RunConfig
from luce_core.contract.errors import LuceError
from luce_core.contract.impl import ROLES

OPTIONAL_ROLES = ("drafter", "chunk_selector")  # used only when asked for


def _config(model: str | None, overrides: dict[str, Any]) -> tuple[RunConfig, str]:
    roles = {r: overrides.pop(r) for r in list(overrides) if r in ROLES}
    note = ""
    if model is None:
        from luce_core.default_model import DEFAULT_MODEL, cache_dir
        cached = cache_dir() / "models" / DEFAULT_MODEL.filename
        model = str(cached) if cached.exists() else ""
        note = "" if model else "default model not fetched yet (run `luce generate` once); model-dependent checks skipped"
    return RunConfig(model_path=model or "", overrides=roles, **overrides), note


def report(model: str | None = None, *, caps: str | None = None, overrides: dict[str, Any] | None = None,
           as_json: bool = False) -> str:
    c = probe(caps)
    config, note = _config(model, dict(overrides or {}))
    host = plugin_host.host()
    out: dict[str, Any] = {"caps": c.summary(), "plugins": {n: host.distributions.get(n, "in-process")
                                                            for n in host.plugin_names()},
                           "plugin_errors": host.load_errors, "roles": {}, "notes": [note] if note else []}
    if config.model_path:
        try:
            loader = selection.select("loader", host.impls("loader"), c, config).create(c, config)
            loaded = loader.load(config.model_path, config)
            config = config.with_model(loaded.config, {t.qtype for t in loaded.tensors.values()})
            out["model"] = {"path": config.model_path, **attrs.asdict(loaded.config),
                            "tensor_types": sorted(config.weight_types)}
        except LuceError as e:
            out["notes"].append(f"model not loaded: {e}")
    # kv_storage first: the attention candidates are paired with the store it would choose
    explained = {"kv_storage": selection.explain("kv_storage", host.impls("kv_storage"), c, config)}
    kv_impl = next((cand.impl for cand in explained["kv_storage"] if cand.selected), None)
    for role in ROLES:
        cands = explained.get(role) or selection.explain(role, host.impls(role), c, config, kv_storage=kv_impl)
        out["roles"][role] = [{"name": cand.impl.name, "plugin": cand.impl.plugin, "priority": cand.impl.priority,
                               "selected": cand.selected, "reasons": list(cand.reasons)} for cand in cands]
    if as_json:
        return json.dumps(out, indent=2, default=str)
    return _text(out)


def _text(out: dict[str, Any]) -> str:
    c = out["caps"]
    lines = ["capabilities" + (f" (overridden: {', '.join(c['overridden'])})" if c["overridden"] else "")]
    if c["cc"]:
        lines.append(f"  gpu        {c['gpu_name']}  SM {c['cc'][0]}.{c['cc'][1]}  {c['sm_count']} SMs  "
                     f"{c['gpu_memory'] / 2**30:.1f} GiB  driver CUDA {c['driver_cuda']}")
        tcs = [n for n in ("fp16", "bf16", "fp8", "fp4") if c[f"{n}_tc"]]
        lines.append(f"  tensor cores  {', '.join(tcs) or 'none'}")
    else:
        lines.append("  gpu        none (no NVIDIA driver seen)")
    lines.append(f"  torch CUDA {c['torch_cuda']}   compute device: {c['device']}")
    lines.append(f"  NVRTC      {'.'.join(map(str, c['nvrtc'])) if c['nvrtc'] else 'not installed'}"
                 + (f"  archs sm_{min(c['nvrtc_archs'])}..sm_{max(c['nvrtc_archs'])}" if c["nvrtc_archs"] else ""))
    lines.append(f"  cpu        {c['cpu_name']}  ({len(c['cpu_flags'])} ISA flags"
                 + (", avx2" if "avx2" in c["cpu_flags"] else "") + (", avx512f" if "avx512f" in c["cpu_flags"] else "") + ")")
    if "model" in out:
        m = out["model"]
        lines.append(f"model  {m['path']}\n  {m['arch']}  {m['n_layers']} layers  hidden {m['hidden']}  "
                     f"heads {m['n_heads']}/{m['n_kv_heads']}  types {', '.join(m['tensor_types'])}")
    lines.append("plugins  " + ", ".join(f"{n} ({d})" for n, d in out["plugins"].items()))
    for n, e in out["plugin_errors"].items():
        lines.append(f"  plugin {n} failed to import: {e}")
    for role, rows in out["roles"].items():
        optional = " (used only when asked for)" if role in OPTIONAL_ROLES else ""
        lines.append(f"{role}{optional}")
        if not rows:
            lines.append("  (no implementation installed)")
        for r in rows:
            if optional:  # nothing is chosen until the user names one (--drafter / --chunk-selector)
                state, mark = "; ".join(r["reasons"]) or "available", " "
            else:
                state = "selected" if r["selected"] else "; ".join(r["reasons"]) or "runnable (lower priority)"
                mark = "*" if r["selected"] else " "
            lines.append(f"  {mark} {r['name']:<14} [{r['plugin']}, prio {r['priority']}]  {state}")
    lines += [f"note: {n}" for n in out["notes"]]
    return "\n".join(lines)

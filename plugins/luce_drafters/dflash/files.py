"""DFlash drafter files: safetensors (state dict + ``__metadata__`` {"format": "luce-dflash",
"config": JSON of :class:`DFlashConfig`}) or GGUF (architecture ``luce-dflash``, key
``luce-dflash.config`` = the same JSON, tensors F32/F16 under the state-dict names).
``load_drafter`` tells them apart by magic."""
from __future__ import annotations

import os

import torch
from torch import nn

from luce_core.formats.dtypes import TORCH_DTYPES
from luce_core.plugin_api import ModelFileError
from luce_drafters.dflash.config import FORMAT, DFlashConfig


def save_drafter(path: str | os.PathLike[str], cfg: DFlashConfig, model: nn.Module, dtype: str = "f32") -> None:
    """Write a drafter as .safetensors or .gguf (by extension), weights in f32 or f16."""
    tdt = TORCH_DTYPES[dtype]
    state = {k: v.detach().to("cpu", tdt).contiguous() for k, v in model.state_dict().items()}
    path = str(path)
    if path.endswith(".gguf"):
        import gguf

        w = gguf.GGUFWriter(path, FORMAT)
        w.add_string(f"{FORMAT}.config", cfg.to_json())
        for k, v in state.items():
            w.add_tensor(k, v.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    else:
        from safetensors.torch import save_file

        save_file(state, path, metadata={"format": FORMAT, "config": cfg.to_json()})


def load_drafter(path: str | os.PathLike[str]) -> tuple[DFlashConfig, dict[str, torch.Tensor]]:
    """The config and state dict of a drafter file (``model.build_model`` makes the module)."""
    path = str(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"DFlash drafter file not found: {path}",
                             remedy="train one with `luce train-drafter --target MODEL.gguf --out FILE`")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        import gguf

        r = gguf.GGUFReader(path)
        field = r.fields.get(f"{FORMAT}.config")
        if field is None:
            raise ModelFileError(f"{path} is a GGUF but not a luce DFlash drafter (no {FORMAT}.config)",
                                 remedy="pass a file written by `luce train-drafter`")
        cfg = DFlashConfig.from_json(bytes(field.parts[field.data[0]]).decode("utf-8"))
        state = {t.name: torch.from_numpy(t.data.copy()).reshape([int(d) for d in reversed(t.shape)])
                 for t in r.tensors}
        return cfg, state
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except SafetensorError as e:
        raise ModelFileError(f"{path} is neither a GGUF nor a safetensors file ({e})",
                             remedy="pass a file written by `luce train-drafter`") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ModelFileError(f"{path} is a safetensors file but not a luce DFlash drafter",
                             remedy="pass a file written by `luce train-drafter`")
    return DFlashConfig.from_json(meta["config"]), state

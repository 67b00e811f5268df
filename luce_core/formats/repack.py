"""``--weights nvfp4``: the model's matmul weights re-quantized to NVFP4 once, at load.

One pure function, :func:`repack_nvfp4` (LoadedModel -> LoadedModel). Every 2-D weight the
``linear`` role multiplies by (attention q/k/v/output, FFN gate/up/down, the LM head) is
dequantized from its stored type (luce_core.formats.dequant, bit-exact with ggml) and re-quantized with
luce's own quantizer (luce_core.formats.quantize.quantize_nvfp4: E2M1 values, one UE4M3 scale per 16,
one FP32 tensor scale). Everything else (norms, biases, rope factors, the token embedding) keeps
its stored form and stays a view of the memory map.

Choices:
* Tied LM head: the embedding table is only gathered (one row per token), so it keeps its source
  type; the head gets its own NVFP4 copy as ``output.weight`` (the graph prefers it when present)
  and the config says untied. The head is the largest matrix of a small model (SmolLM2: a fifth
  of the weights), so decode reads it in 4.5 bits too.
* Projections that read the same input (q/k/v, gate/up) share one FP32 tensor scale, so the
  graph can still fuse them into one matmul (it fuses only equal scales). The per-16 UE4M3 scales
  still follow each block; a shared tensor scale only matters for blocks 2^14 times smaller than
  the group's largest, which weights do not have.
* F16/BF16/F32/Q8_0 are the intended sources. Already low-bit types (Q4_0/Q4_1/Q4_K/Q6_K) are
  repacked too, with one warning: the result carries both quantization errors.
"""
from __future__ import annotations

import collections
import re
import sys
import time
import warnings
from typing import Iterable, Sequence

import attrs

from luce_core.formats.blocks import BLOCKS
from luce_core.contract.types import LoadedModel, QTensor

WIDE_SOURCES = ("F32", "F16", "BF16", "Q8_0")  # >= 8 bits: the 4-bit target's error dominates
# Per layer: groups of matmuls that read the same input (share a tensor scale), then the rest.
LAYER_GROUPS: tuple[tuple[str, ...], ...] = (("attn_q", "attn_k", "attn_v"), ("attn_output",),
                                             ("ffn_gate", "ffn_up"), ("ffn_down",))
_LAYER = re.compile(r"^blk\.(\d+)\.")


def matmul_groups(loaded: LoadedModel, lm_head: bool = True) -> list[tuple[str, ...]]:
    """Names of the weights the repack converts, in groups that share a tensor scale. The LM
    head is ``output.weight``, or ``token_embd.weight`` when tied (repacked into a new
    ``output.weight``); it is left out with ``lm_head=False``."""
    t = loaded.tensors
    layers = sorted({int(m.group(1)) for n in t if (m := _LAYER.match(n))})
    groups = []
    for i in layers:
        for g in LAYER_GROUPS:
            names = tuple(f"blk.{i}.{n}.weight" for n in g if f"blk.{i}.{n}.weight" in t)
            if names:
                groups.append(names)
    if lm_head:
        groups.append(("output.weight",) if "output.weight" in t else ("token_embd.weight",))
    return groups


def _repackable(w: QTensor, qtype: str) -> bool:
    return len(w.shape) == 2 and w.shape[1] % BLOCKS[qtype][0] == 0 and w.qtype != qtype


def _quantize_group(ws: Sequence[QTensor], qtype: str) -> list[QTensor]:
    """Each weight as ``qtype``; NVFP4 with one tensor scale for the group (rows quantized together)."""
    import torch

    from luce_core.formats.dequant import dequantize_qtensor
    from luce_core.formats.quantize import quantize, quantize_nvfp4

    with torch.inference_mode():
        rows = torch.cat([dequantize_qtensor(w) for w in ws]) if len(ws) > 1 else dequantize_qtensor(ws[0])
        data, scale = quantize_nvfp4(rows) if qtype == "NVFP4" else (quantize(rows, qtype), 1.0)
    out, at = [], 0
    for w in ws:
        n = w.shape[0]
        out.append(QTensor(w.name, qtype, w.shape, data[at:at + n], scale))
        at += n
    return out


def _progress(groups: list[tuple[str, ...]], qtype: str, enabled: bool) -> Iterable[tuple[str, ...]]:
    from tqdm import tqdm  # as plan's "preparing weights" bar: stderr, cleared when done

    return tqdm(groups, desc=f"repacking to {qtype}", disable=not enabled, leave=False, file=sys.stderr, unit="group")


def repack_nvfp4(loaded: LoadedModel, *, lm_head: bool = True, progress: bool = False) -> LoadedModel:
    """``loaded`` with its matmul weights in NVFP4 (see the module doc); the input is not changed.

    Matrices already NVFP4, or whose rows are not whole 64-element blocks, keep their form.
    """
    return repack(loaded, "NVFP4", lm_head=lm_head, progress=progress)


def repack(loaded: LoadedModel, qtype: str, *, lm_head: bool = True, progress: bool = False) -> LoadedModel:
    """The same for any type luce quantizes (weight_quality compares NVFP4 with Q4_0 this way)."""
    t0 = time.perf_counter()
    tensors: dict[str, QTensor] = dict(loaded.tensors)
    sources: collections.Counter[str] = collections.Counter()
    kept: list[str] = []
    for names in _progress(matmul_groups(loaded, lm_head), qtype, progress):
        ws = [loaded.tensors[n] for n in names]
        todo = [w for w in ws if _repackable(w, qtype)]
        kept += [w.name for w in ws if not _repackable(w, qtype) and w.qtype != qtype]
        if not todo:
            continue
        sources.update(w.qtype for w in todo)
        for w in _quantize_group(todo, qtype):
            if w.name == "token_embd.weight":  # tied head: its own copy; the lookup keeps the source
                w = attrs.evolve(w, name="output.weight")
            tensors[w.name] = w
    narrow = sorted(set(sources) - set(WIDE_SOURCES))
    if narrow:
        warnings.warn(f"luce: re-quantizing {'/'.join(narrow)} weights (already low-bit) to {qtype} compounds "
                      f"both quantization errors; an F16/BF16/Q8_0 GGUF of the same model gives {qtype} "
                      f"weights closer to the original", stacklevel=3)
    if kept:
        warnings.warn(f"luce: {len(kept)} matrices keep their stored type: their rows are not whole "
                      f"{BLOCKS[qtype][0]}-element {qtype} blocks (e.g. {kept[0]})", stacklevel=3)
    config = loaded.config
    if "output.weight" in tensors and "output.weight" not in loaded.tensors:
        config = attrs.evolve(config, tied_embeddings=False)
    meta = dict(loaded.metadata)
    meta.update(
        tensor_types=dict(sorted(collections.Counter(w.qtype for w in tensors.values()).items())),
        weight_bytes=sum(w.nbytes for w in tensors.values()),
        repacked={"to": qtype, "lm_head": lm_head, "from": dict(sorted(sources.items())),
                  "tensors": sum(sources.values()), "seconds": round(time.perf_counter() - t0, 3)})
    # other weights, other activations: a KV snapshot of the source model must not restore here
    tag = f"+{qtype.lower()}" + ("" if lm_head else "-body")
    return attrs.evolve(loaded, tensors=tensors, config=config, metadata=meta, fingerprint=loaded.fingerprint + tag)

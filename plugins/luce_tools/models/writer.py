"""Streaming GGUF writing: tensor infos first, then each tensor produced, written and dropped.

Used by the synthetic model writer (a 1.2B model never sits in memory as floats) and by
``rewrite_gguf``, which copies a GGUF with edits (tests write broken files with it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import attrs
import numpy as np

from luce_core.formats.blocks import row_bytes
from luce_tools import harness
from luce_tools.models.quants import quantize_rows


def ggml_nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    try:
        return rows * row_bytes(qtype, shape[-1])
    except Exception:  # a type luce cannot read (e.g. Q5_0 in a test file): ask gguf
        import gguf

        elems, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        return rows * shape[-1] // elems * nbytes


@attrs.frozen
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # logical row-major
    qtype: str
    produce: Callable[[], np.ndarray]  # -> uint8 bytes of exactly nbytes

    @property
    def nbytes(self) -> int:
        return ggml_nbytes(self.qtype, self.shape)


def value_type(value: Any) -> tuple[Any, Any]:
    """(GGUFValueType, sub type) for a Python metadata value."""
    from gguf import GGUFValueType as T

    def scalar(v: Any) -> Any:
        if isinstance(v, bool):
            return T.BOOL
        if isinstance(v, int):
            return T.UINT32 if 0 <= v < 2**32 else T.INT64
        if isinstance(v, float):
            return T.FLOAT32
        if isinstance(v, str):
            return T.STRING
        raise TypeError(f"cannot store {type(v).__name__} in GGUF metadata")

    if isinstance(value, (list, tuple)):
        return T.ARRAY, scalar(value[0])
    return scalar(value), None


class StreamWriter:
    """Collect metadata and planned tensors, then write the file in one pass."""

    def __init__(self, path: str | os.PathLike[str], arch: str):
        self.path = os.fspath(path)
        self.arch = arch
        self.kv: dict[str, tuple[Any, Any, Any]] = {}  # key -> (value, type, sub type)
        self.tensors: list[PlannedTensor] = []

    def add(self, key: str, value: Any, vtype: Any = None, sub_type: Any = None) -> None:
        if vtype is None:
            vtype, sub_type = value_type(value)
        self.kv[key] = (value, vtype, sub_type)

    def copy_key(self, src: Any, key: str) -> None:
        """Metadata ``key`` of ``src`` (a luce_gguf.reader.GGUFFile), with its stored GGUF type."""
        types = src.field_types(key)
        self.add(key, src.get(key), types[0], types[-1] if len(types) > 1 else None)  # arrays: element type

    def add_tensor(self, name: str, shape: tuple[int, ...], qtype: str, produce: Callable[[], np.ndarray]) -> None:
        self.tensors.append(PlannedTensor(name, tuple(int(d) for d in shape), qtype, produce))

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def write(self, progress: bool = False, desc: str = "writing") -> None:
        import gguf

        w = gguf.GGUFWriter(self.path, self.arch)
        for key, (value, vtype, sub_type) in self.kv.items():
            if key != "general.architecture":  # GGUFWriter already wrote it from arch
                w.add_key_value(key, value, vtype, sub_type=sub_type)
        for t in self.tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                              raw_dtype=gguf.GGMLQuantizationType[t.qtype])
        tmp = self.path + ".part"
        try:
            w.write_header_to_file(Path(tmp))
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with harness.progress(self.total_bytes(), desc, progress, unit="B", unit_scale=True) as bar:
                for t in self.tensors:
                    data = np.ascontiguousarray(t.produce()).view(np.uint8)
                    if data.nbytes != t.nbytes:
                        raise ValueError(f"tensor {t.name}: produced {data.nbytes} bytes, planned {t.nbytes}")
                    w.write_tensor_data(data)
                    bar.update(t.nbytes)
            w.close()
            os.replace(tmp, self.path)  # a killed run never leaves a half file under the real name
        finally:
            w.close()
            if os.path.exists(tmp):
                os.unlink(tmp)


_NUMERIC = tuple(range(0, 7)) + (10, 11, 12)  # GGUFValueType ints/floats (not bool, string, array)


def rewrite_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                 kv: Mapping[str, Any] | None = None,
                 drop: Iterable[str] = (),
                 tensors: Mapping[str, tuple[np.ndarray, str]] | None = None) -> None:
    """Copy GGUF ``src`` to ``dst`` with edits: metadata ``kv`` set (typed like the existing key
    when there is one), tensors in ``drop`` left out, and ``tensors`` (name -> (values, qtype))
    replacing or adding tensors: float values in logical shape are quantized to qtype, uint8
    values are taken as the raw blocks."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(src), "r")
    kv = dict(kv or {})
    replace = dict(tensors or {})
    drop = set(drop)
    arch = kv.get("general.architecture", reader.fields["general.architecture"].contents())
    out = StreamWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        if key in kv:
            value = kv.pop(key)
            vtype, _ = value_type(value)
            same_kind = vtype == main or (vtype in _NUMERIC and main in _NUMERIC)
            out.add(key, value, main, sub) if same_kind else out.add(key, value)
        else:
            out.add(key, field.contents(), main, sub)
    for key, value in kv.items():
        out.add(key, value)
    for rt in reader.tensors:
        if rt.name in drop or rt.name in replace:
            continue
        shape = tuple(int(d) for d in reversed(rt.shape.tolist()))
        out.add_tensor(rt.name, shape, rt.tensor_type.name, lambda rt=rt: rt.data.view(np.uint8))
    for name, (values, qtype) in replace.items():
        values = np.asarray(values)
        if values.dtype == np.uint8:  # raw ggml blocks [rows, row_bytes], written as they are
            elems, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
            shape = (*values.shape[:-1], values.shape[-1] // nbytes * elems)
            out.add_tensor(name, shape, qtype, lambda v=values: v)
        else:
            values = values.astype(np.float32)
            out.add_tensor(name, values.shape, qtype, lambda v=values, q=qtype: quantize_rows(v, q)[0])
    out.write()

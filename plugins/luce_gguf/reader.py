"""Open a GGUF file as a memory map and turn its tensors into QTensors (views, never copies).

``gguf.GGUFReader`` does the parsing (through a subclass that reads metadata arrays in one loop
and names the tensor a truncated file cuts off); everything it may raise on a damaged file is
turned into a ``ModelFileError`` that names the file, so users never see a raw traceback.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from typing import Any, Iterator

import attrs
import numpy as np

from luce_core.plugin_api import ModelFileError, QTensor, UnsupportedModelError
from luce_core.formats.blocks import BLOCKS, SUPPORTED

GGUF_MAGIC = b"GGUF"
_MISSING: Any = object()


def check_gguf_path(path: str) -> None:
    """Raise ModelFileError unless ``path`` is a readable file that starts with the GGUF magic."""
    if not os.path.exists(path):
        raise ModelFileError(f"model file not found: {path}",
                             remedy="check the path, or omit --model to use the default model")
    if not os.path.isfile(path):
        raise ModelFileError(f"model path is not a file: {path}", remedy="pass the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}",
                             remedy="check the file's permissions") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})",
                             remedy="pass a .gguf model (convert Hugging Face checkpoints with "
                                    "llama.cpp's convert_hf_to_gguf.py)")


@attrs.frozen(eq=False)
class GGUFFile:
    """A parsed GGUF: metadata fields and tensor records, data still on disk (memory-mapped)."""

    path: str
    reader: Any  # gguf.GGUFReader
    size: int
    tensors: dict[str, Any]  # name -> gguf ReaderTensor, in file order
    _cache: dict[str, Any] = attrs.field(factory=dict)

    # ------------------------------------------------------------------ metadata
    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Decoded value of a metadata key (strings as str, arrays as lists)."""
        if key in self._cache:
            return self._cache[key]
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ModelFileError(f"{self.path}: metadata key {key!r} is missing",
                                     remedy="the GGUF is incomplete; re-convert or re-download it")
            return default
        try:
            value = field.contents()
        except Exception as e:  # e.g. a string that is not UTF-8
            raise ModelFileError(f"{self.path}: metadata key {key!r} cannot be decoded ({e})",
                                 remedy="the file is corrupt; re-download it") from None
        self._cache[key] = value
        return value

    def keys(self) -> Iterator[str]:
        return iter(self.reader.fields)

    def field_types(self, key: str) -> list[Any]:
        return list(self.reader.fields[key].types)

    # ------------------------------------------------------------------ tensors
    def qtype(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def logical_shape(self, name: str) -> tuple[int, ...]:
        # GGUF stores ne (fastest dimension first); row-major logical order is the reverse.
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def qtensor(self, name: str) -> QTensor:
        """The tensor ``name`` as a QTensor viewing the memory map (no copy)."""
        rt = self.tensors[name]
        qtype = rt.tensor_type.name
        shape = self.logical_shape(name)
        if qtype not in BLOCKS:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name} has type {qtype}, which luce cannot read",
                remedy=f"supported types: {', '.join(SUPPORTED)}; re-quantize the model to one of them")
        elems, block_bytes = BLOCKS[qtype]
        if shape[-1] % elems:
            raise ModelFileError(f"{self.path}: tensor {name} ({qtype}) has rows of {shape[-1]} elements, "
                                 f"not a multiple of the {elems}-element block", remedy="the file is corrupt")
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        row_bytes = shape[-1] // elems * block_bytes
        # reader.data is already a view of the memmap; view/reshape keep it one (no copy).
        data = rt.data.view(np.uint8).reshape(rows, row_bytes)
        return QTensor(name=name, qtype=qtype, shape=shape, data=data)

    def tensor_table_digest(self) -> bytes:
        h = hashlib.sha256()
        for name, rt in self.tensors.items():
            h.update(f"{name}|{rt.tensor_type.value}|{rt.shape.tolist()}|{rt.data_offset};".encode())
        return h.digest()


_STRING, _ARRAY = 8, 9  # GGUFValueType ids (plain ints: enum lookups cost per item)


class _Truncated(Exception):
    def __init__(self, need: int, tensor: str | None = None):
        super().__init__(need, tensor)
        self.need, self.tensor = need, tensor


@functools.lru_cache(maxsize=1)
def _reader_class() -> type:
    import gguf

    class FastGGUFReader(gguf.GGUFReader):
        """GGUFReader whose small reads slice a plain ndarray view of the memory map: slicing the
        np.memmap itself runs memmap.__array_finalize__ per slice, which made parsing a 49k-token
        vocabulary take seconds. Results (and tensor views of the map) are the same. Reads past
        the end of the file raise _Truncated, so a cut file gets a clear message."""

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dt = np.dtype(dtype)
            count = int(count)
            end = offset + dt.itemsize * count
            if end > plain.shape[0]:
                raise _Truncated(end)
            arr = plain[offset:end].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(dt.newbyteorder(order))

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
            # Arrays (vocabulary, merges, token types: ~10^5 items) in one tight loop; the parent
            # recurses per item. Same parts: [item type, count, then per item (length, bytes) for
            # strings or a 1-element array for scalars].
            if raw_type != _ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            head = self._get(orig_offs, np.uint32)
            item_type = int(head[0])
            scalar = self.gguf_scalar_to_np.get(gguf.GGUFValueType(item_type)) if item_type != _STRING else None
            if item_type != _STRING and scalar is None:
                return super()._get_field_parts(orig_offs, raw_type)  # nested arrays: rare, small
            count = self._get(orig_offs + 4, np.uint64)
            n_items = int(count[0])
            offs = orig_offs + 12
            parts: list[Any] = [head, count]
            # the parent learns the item type from the first item: an empty array has none
            types = [gguf.GGUFValueType(_ARRAY)] + ([gguf.GGUFValueType(item_type)] if n_items else [])
            if scalar is not None:
                values = self._get(offs, scalar, n_items)
                parts += [values[i:i + 1] for i in range(n_items)]
                return 12 + int(values.nbytes), parts, list(range(2, 2 + n_items)), types
            plain = self._plain
            n_total = plain.shape[0]
            native = self.byte_order == "I" and sys.byteorder == "little"
            for _ in range(n_items):
                if offs + 8 > n_total:
                    raise _Truncated(offs + 8)
                length_part = plain[offs:offs + 8].view(np.uint64) if native else self._get(offs, np.uint64)
                n = int(length_part[0])
                if offs + 8 + n > n_total:
                    raise _Truncated(offs + 8 + n)
                parts.append(length_part)
                parts.append(plain[offs + 8:offs + 8 + n])
                offs += 8 + n
            return offs - orig_offs, parts, list(range(3, len(parts), 2)), types

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            size = self.data.shape[0]
            for field in fields:  # name the first tensor whose data the file does not hold
                _, name, _, dims, raw_type, offset = field.parts
                try:
                    elems, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
                except (ValueError, KeyError):
                    continue  # unknown type: the parent raises about it
                end = int(start_offs) + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * nbytes // elems
                if end > size:
                    raise _Truncated(end, bytes(name).decode("utf-8", "replace"))
            super()._build_tensors(start_offs, fields)

    return FastGGUFReader


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse ``path`` (memory-mapped). Raises ModelFileError naming the file for any damage."""
    path = os.fspath(path)
    check_gguf_path(path)
    size = os.path.getsize(path)
    try:
        reader = _reader_class()(path, "r")
    except _Truncated as e:
        where = f"tensor {e.tensor} needs" if e.tensor else "its header (metadata and tensor table) needs"
        raise ModelFileError(f"{path} is truncated: {where} bytes up to {e.need} but the file has {size}",
                             remedy="re-download or re-convert the file (an interrupted copy?)") from None
    except Exception as e:  # GGUFReader raises ValueError/IndexError/struct errors on damaged files
        raise ModelFileError(f"{path} is truncated or corrupt (the GGUF header cannot be parsed: "
                             f"{type(e).__name__}: {e})", remedy="re-download or re-convert the file") from None
    tensors: dict[str, Any] = {}
    for rt in reader.tensors:
        end = int(rt.data_offset) + int(rt.n_bytes)
        if end > size or rt.data.nbytes != rt.n_bytes:
            raise ModelFileError(f"{path} is truncated: tensor {rt.name} needs bytes up to {end} "
                                 f"but the file has {size}", remedy="re-download or re-convert the file")
        tensors[rt.name] = rt
    return GGUFFile(path=path, reader=reader, size=size, tensors=tensors)


def fingerprint(f: GGUFFile, sample: int = 1 << 20) -> str:
    """A cheap stable id of the weights: file size, tensor table and three 1 MiB samples of the
    tensor data (start, middle, end), so a KV snapshot refuses a different model or fine-tune."""
    h = hashlib.sha256()
    h.update(f"gguf|{f.size}|".encode())
    h.update(f.tensor_table_digest())
    start = int(f.reader.data_offset)
    span = max(f.size - start, 0)
    mm = f.reader.data
    for at in (start, start + span // 2 - sample // 2, f.size - sample):
        at = max(start, min(at, f.size))
        h.update(np.asarray(mm[at:at + sample]).tobytes())
    return h.hexdigest()[:32]

"""Open a GGUF file as a memory map and turn its tensors into QTensors (views, never copies).

``gguf.GGUFReader`` does the parsing, through a subclass that validates before it reads or
allocates: metadata and tensor counts, string and array lengths against the bytes left in the
file; value types; tensor names, dims and types; tensors contiguous in table order at ggml's
alignment, inside the file, with nothing unexplained after them. Every failure is a
``ModelFileError`` naming the file and the field, with echoed file strings cut to 80 characters.
``GGUFFile.get_int/get_float/get_str`` type- and range-check hyper-parameters.
"""
from __future__ import annotations

import functools
import hashlib
import math
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
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.path}: metadata {key} holds text that is not valid UTF-8",
                                 remedy="the file is corrupt; re-download it") from None
        self._cache[key] = value
        return value

    def _typed(self, key: str, default: Any, kinds: frozenset[int], what: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return self.get(key, default)
        if len(field.types) != 1 or int(field.types[0]) not in kinds:
            raise ModelFileError(f"{self.path}: metadata {key} is stored as "
                                 f"{'/'.join(t.name for t in field.types)}, expected {what}",
                                 remedy="the file is corrupt or mis-converted; re-convert it")
        return self.get(key)

    def get_int(self, key: str, default: Any = _MISSING, lo: int = 1, hi: int = (1 << 31) - 1) -> int:
        """An integer metadata value in [lo, hi] (ModelFileError naming the key otherwise)."""
        value = self._typed(key, default, _INT_TYPES, "an integer")
        if not lo <= int(value) <= hi:
            raise ModelFileError(f"{self.path}: metadata {key}={int(value)} is outside {lo}..{hi}",
                                 remedy="the file is corrupt or mis-converted; re-convert it")
        return int(value)

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        """A positive finite number (FLOAT32 values as the decimal the converter wrote)."""
        value = float(self._typed(key, default, _FLOAT_TYPES | _INT_TYPES, "a number"))
        field = self.reader.fields.get(key)
        if field is not None and int(field.types[0]) == 6:
            value = float(str(np.float32(value)))  # FLOAT32 as written: 9.9999997e-06 -> 1e-05
        if not (math.isfinite(value) and value > 0):
            raise ModelFileError(f"{self.path}: metadata {key}={value} must be a positive finite number",
                                 remedy="the file is corrupt or mis-converted; re-convert it")
        return value

    def get_str(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, frozenset((_STRING,)), "a string")

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
_INT_TYPES = frozenset((0, 1, 2, 3, 4, 5, 10, 11))  # u8 i8 u16 i16 u32 i32 u64 i64
_FLOAT_TYPES = frozenset((6, 12))  # f32 f64
_BOOL = 7
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
MAX_KEYS = 65536  # metadata keys (real models have ~50); bounds parsing time
MAX_TENSORS = 1 << 20
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NAME = 256  # bytes of a tensor name or metadata key (ggml allows 63 for tensors)
MAX_ECHO = 80  # characters of a file-supplied string echoed in a message


def echo(value: object) -> str:
    """repr() of a file-supplied value, cut to MAX_ECHO characters (messages stay bounded)."""
    text = repr(value)
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + f"...({len(text)} chars)"


class _Truncated(Exception):
    def __init__(self, need: int, tensor: str | None = None):
        super().__init__(need, tensor)
        self.need, self.tensor = need, tensor


class _Corrupt(Exception):
    """A structural error found while parsing; open_gguf prefixes the path."""


class _TooShort(_Corrupt):
    """A count that the rest of the file cannot hold: a cut file or a corrupt count."""


def _text(raw: np.ndarray, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _Corrupt(f"{what} is not valid UTF-8 ({echo(bytes(raw[:MAX_ECHO]))})") from None


@functools.lru_cache(maxsize=1)
def _reader_class() -> type:
    import gguf

    class FastGGUFReader(gguf.GGUFReader):
        """GGUFReader that checks every count, length, type and offset against the file before it
        reads or allocates (raising _Corrupt / _Truncated), and whose small reads slice a plain
        ndarray view of the memory map: slicing the np.memmap itself runs
        memmap.__array_finalize__ per slice, which made parsing a 49k-token vocabulary take
        seconds. Results (and tensor views of the map) are the same as GGUFReader's."""

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

        def _left(self, offs: int) -> int:
            return int(self.data.shape[0]) - offs

        def _build_fields(self, offs: int, count: int) -> int:
            count = int(count)
            # a record is at least 13 bytes (key length, type, one-byte value)
            if count > MAX_KEYS or count * 13 > self._left(offs):
                raise _TooShort(f"the header claims {count} metadata keys, more than the rest of the file "
                                f"can hold (or than the {MAX_KEYS} luce accepts)")
            for _ in range(count):
                orig = offs
                klen = self._get(offs, np.uint64)
                if int(klen[0]) > MAX_NAME:
                    raise _Corrupt(f"a metadata key at byte {offs} is {int(klen[0])} bytes long (at most {MAX_NAME})")
                kdata = self._get(offs + 8, np.uint8, int(klen[0]))
                key = _text(kdata, f"the metadata key at byte {offs}")
                offs += 8 + int(klen[0])
                raw_type = self._get(offs, np.uint32)
                vtype = int(raw_type[0])
                offs += 4
                if vtype not in _SCALAR_BYTES and vtype not in (_STRING, _ARRAY):
                    raise _Corrupt(f"metadata {echo(key)} has unknown value type {vtype}")
                if key in self.fields:
                    raise _Corrupt(f"metadata key {echo(key)} appears twice")
                size, parts, idxs, types = self._get_field_parts(offs, vtype, key)
                self.fields[key] = gguf.ReaderField(orig, key, [klen, kdata, raw_type, *parts],
                                                    [i + 3 for i in idxs], types)
                offs += size
            return offs

        def _get_field_parts(self, orig_offs: int, raw_type: int,
                             key: str = "") -> tuple[int, list[Any], list[int], list[Any]]:
            # Arrays (vocabulary, merges, token types: ~10^5 items) in one tight loop; the parent
            # recurses per item. Same parts: [item type, count, then per item (length, bytes) for
            # strings or a 1-element array for scalars].
            if raw_type != _ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            head = self._get(orig_offs, np.uint32)
            item_type = int(head[0])
            if item_type == _ARRAY:  # ggml rejects these too
                raise _Corrupt(f"metadata {echo(key)} is an array of arrays, which GGUF readers do not accept")
            if item_type not in _SCALAR_BYTES and item_type != _STRING:
                raise _Corrupt(f"metadata {echo(key)} is an array of unknown type {item_type}")
            count = self._get(orig_offs + 4, np.uint64)
            n_items = int(count[0])
            offs = orig_offs + 12
            if n_items * (8 if item_type == _STRING else _SCALAR_BYTES[item_type]) > self._left(offs):
                raise _TooShort(f"metadata {echo(key)} claims {n_items} items, more than the rest of the file can hold")
            parts: list[Any] = [head, count]
            # the parent learns the item type from the first item: an empty array has none
            types = [gguf.GGUFValueType(_ARRAY)] + ([gguf.GGUFValueType(item_type)] if n_items else [])
            if item_type != _STRING:
                values = self._get(offs, self.gguf_scalar_to_np[gguf.GGUFValueType(item_type)], n_items)
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

        def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[Any]]:
            self._check_alignment()
            count = int(count)
            # a tensor info is at least 32 bytes (name length, one dim, type, offset)
            if count > MAX_TENSORS or count * 32 > self._left(offs):
                raise _TooShort(f"the header claims {count} tensors, more than the rest of the file can hold")
            fields, names = [], set()
            for _ in range(count):
                orig = offs
                name_len = self._get(offs, np.uint64)
                if int(name_len[0]) > MAX_NAME:
                    raise _Corrupt(f"the tensor name at byte {offs} is {int(name_len[0])} bytes long "
                                   f"(at most {MAX_NAME})")
                name_data = self._get(offs + 8, np.uint8, int(name_len[0]))
                name = _text(name_data, f"the tensor name at byte {offs}")
                if name in names:
                    raise _Corrupt(f"tensor {echo(name)} appears twice in the tensor table")
                names.add(name)
                offs += 8 + int(name_len[0])
                n_dims = self._get(offs, np.uint32)
                if not 1 <= int(n_dims[0]) <= MAX_DIMS:
                    raise _Corrupt(f"tensor {echo(name)} has {int(n_dims[0])} dimensions (1 to {MAX_DIMS} allowed)")
                dims = self._get(offs + 4, np.uint64, int(n_dims[0]))
                offs += 4 + int(dims.nbytes)
                raw_dtype = self._get(offs, np.uint32)
                offset = self._get(offs + 4, np.uint64)
                offs += 12
                self._check_tensor(name, [int(d) for d in dims], int(raw_dtype[0]))
                fields.append(gguf.ReaderField(orig, name, [name_len, name_data, n_dims, dims, raw_dtype, offset],
                                               [1, 3, 4, 5]))
            return offs, fields

        def _check_alignment(self) -> None:
            field = self.fields.get("general.alignment")
            if field is None:
                return
            if field.types != [gguf.GGUFValueType.UINT32]:
                raise _Corrupt("metadata general.alignment must be a UINT32")
            value = int(field.parts[-1][0])
            # ggml needs a power of two; the GGUF spec also asks for a multiple of 8
            if value < 8 or value & (value - 1):
                raise _Corrupt(f"metadata general.alignment={value} is not a power of two of at least 8")

        @staticmethod
        def _check_tensor(name: str, dims: list[int], raw_type: int) -> None:
            try:
                qtype = gguf.GGMLQuantizationType(raw_type)
                elems, _ = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise _Corrupt(f"tensor {echo(name)} has unknown ggml type {raw_type}") from None
            n = 1
            for d in dims:
                n *= d
            if n >= 1 << 62:
                raise _Corrupt(f"tensor {echo(name)} has shape {echo(dims)}, more elements than a file can hold")
            if dims[0] % elems:
                raise _Corrupt(f"tensor {echo(name)} ({qtype.name}) has rows of {dims[0]} elements, "
                               f"not a multiple of its {elems}-element block")

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            # ggml's rule: tensors lie in table order, each at the previous one's end padded to
            # the alignment; the file then ends within one alignment of the last tensor's end.
            size, expected, end = int(self.data.shape[0]), 0, 0
            align = int(self.alignment)
            for field in fields:
                _, _, _, dims, raw_type, offset = field.parts
                elems, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
                n = 1
                for d in dims.tolist():
                    n *= int(d)
                n_bytes = n // elems * nbytes
                if int(offset[0]) != expected:
                    raise _Corrupt(f"tensor {echo(field.name)} starts at byte {int(offset[0])} of the data section, "
                                   f"expected {expected} (tensors follow each other in table order, "
                                   f"padded to {align} bytes)")
                end = int(start_offs) + expected + n_bytes
                if end > size:
                    raise _Truncated(end, field.name)
                expected += -(-n_bytes // align) * align
            if fields and size - end >= align:
                raise _Corrupt(f"{size - end} bytes follow the last tensor's data; the tensor table does not "
                               f"describe the whole file")
            super()._build_tensors(start_offs, fields)

    return FastGGUFReader


def _check_header(path: str, size: int) -> None:
    """Version and counts, before GGUFReader reads them."""
    if size < 24:
        raise ModelFileError(f"{path} is truncated: {size} bytes, shorter than a GGUF header (24)",
                             remedy="re-download or re-convert the file (an interrupted copy?)")
    with open(path, "rb") as fh:
        head = fh.read(8)
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        version = int.from_bytes(head[4:8], "big")
    if version not in (2, 3):
        raise ModelFileError(f"{path} is corrupt or of an unsupported GGUF version ({version}; luce reads 2 and 3)",
                             remedy="re-convert the model with a current llama.cpp converter")


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse ``path`` (memory-mapped). Raises ModelFileError naming the file for any damage."""
    path = os.fspath(path)
    check_gguf_path(path)
    size = os.path.getsize(path)
    _check_header(path, size)
    try:
        reader = _reader_class()(path, "r")
    except _Truncated as e:
        where = f"tensor {echo(e.tensor)} needs" if e.tensor else "its header (metadata and tensor table) needs"
        raise ModelFileError(f"{path} is truncated: {where} bytes up to {e.need} but the file has {size}",
                             remedy="re-download or re-convert the file (an interrupted copy?)") from None
    except _TooShort as e:
        raise ModelFileError(f"{path} is truncated or corrupt: {e}",
                             remedy="re-download or re-convert the file (an interrupted copy?)") from None
    except _Corrupt as e:
        raise ModelFileError(f"{path} is corrupt: {e}", remedy="re-download or re-convert the file") from None
    except (ValueError, KeyError, IndexError, OverflowError) as e:  # anything the checks above missed
        raise ModelFileError(f"{path} is truncated or corrupt (the GGUF header cannot be parsed)",
                             remedy="re-download or re-convert the file") from e
    tensors = {rt.name: rt for rt in reader.tensors}
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

"""KV snapshots: the valid prefix of a KV store's packed bytes, in host memory or in a file.

A snapshot is backend-independent: it holds the stored bytes of every head vector, exactly as
the layout below defines them, so any KV storage implementation using the same layout (the torch
reference, a CUDA store) can restore it. K is stored *after* RoPE and, when ``rotation`` is set,
after the Hadamard rotation, so the rotation's seed and group size are part of the layout.

Per head vector of ``head_dim`` elements the bytes are: little-endian IEEE f32 / f16, bfloat16,
or ggml Q8_0 / Q4_0 blocks (see ``luce_core.formats.blocks``). Payload arrays are uint8
``[n_layers, length, n_kv_heads, row_bytes]`` in C order.

File format, layout version 1 (all integers little-endian)::

    offset  size  field
    0       8     magic b"LUCEKV\\r\\n" (the CR LF catches text-mode mangling)
    8       4     u32 layout version (1)
    12      1     u8 K dtype code    (0 f32, 1 f16, 2 bf16, 3 q8_0, 4 q4_0)
    13      1     u8 V dtype code
    14      1     u8 rotation flag   (1: K holds Hadamard-rotated vectors)
    15      1     u8 reserved, 0
    16      4     u32 rotation group size (0 without rotation)
    20      8     u64 rotation sign seed  (0 without rotation)
    28      4     u32 n_layers
    32      4     u32 n_kv_heads
    36      4     u32 head_dim
    40      4     u32 reserved, 0
    44      8     u64 length (positions)
    52      2     u16 F = fingerprint length in bytes
    54      F     model fingerprint, UTF-8
    54+F    nK    K payload, nK = n_layers*length*n_kv_heads*row_bytes(head_dim, K dtype)
    ...     nV    V payload
    end-32  32    SHA-256 of every preceding byte

Files are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written snapshot under the final name. Loading checks magic, version, header sanity, the
exact file size and the checksum; any failure raises ``SnapshotError``.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
from pathlib import Path

import attrs
import numpy as np

from luce_core.contract.errors import ConfigError, SnapshotError
from luce_core.formats.blocks import vector_bytes

MAGIC = b"LUCEKV\r\n"
LAYOUT_VERSION = 1
DTYPE_CODES: dict[str, int] = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4}
_CODE_DTYPES = {c: d for d, c in DTYPE_CODES.items()}
_HEADER = struct.Struct("<8sI4BIQ4IQH")
_DIGEST = 32
_CHUNK = 16 << 20


@attrs.frozen
class KVLayout:
    """What must match for a snapshot's bytes to mean the same thing in another store."""

    k_dtype: str
    v_dtype: str
    rotation: bool  # K stored rotated (never set for float K)
    rotation_seed: int
    rotation_group: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    fingerprint: str = ""

    @property
    def k_row_bytes(self) -> int:
        return vector_bytes(self.head_dim, self.k_dtype)

    @property
    def v_row_bytes(self) -> int:
        return vector_bytes(self.head_dim, self.v_dtype)

    def payload_shapes(self, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lead = (self.n_layers, length, self.n_kv_heads)
        return (*lead, self.k_row_bytes), (*lead, self.v_row_bytes)


@attrs.frozen(eq=False)
class KVSnapshot:
    """Host copy of positions [0, length) of a store: uint8 payloads shaped by ``layout``."""

    layout: KVLayout
    length: int
    k: np.ndarray
    v: np.ndarray

    def __attrs_post_init__(self) -> None:
        ks, vs = self.layout.payload_shapes(self.length)
        for name, arr, shape in (("k", self.k, ks), ("v", self.v, vs)):
            if arr.dtype != np.uint8 or arr.shape != shape:
                raise SnapshotError(f"snapshot {name} payload is {arr.dtype}{list(arr.shape)}, "
                                    f"layout needs uint8{list(shape)}")

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


def check_restorable(snap: KVSnapshot, layout: KVLayout, capacity: int) -> None:
    """Raise SnapshotError naming every difference that makes ``snap`` meaningless in a store
    with ``layout`` and ``capacity`` positions."""
    diffs = [f"{f.name}: snapshot {getattr(snap.layout, f.name)!r}, store {getattr(layout, f.name)!r}"
             for f in attrs.fields(KVLayout) if getattr(snap.layout, f.name) != getattr(layout, f.name)]
    if snap.length > capacity:
        diffs.append(f"length: snapshot holds {snap.length} positions, store capacity is {capacity}")
    if diffs:
        raise SnapshotError("KV snapshot does not fit this store (" + "; ".join(diffs) + ")",
                            remedy="restore into a store built with the same model, KV dtypes, rotation "
                                   "setting and a context at least as long, or take a new snapshot")


def _header(snap: KVSnapshot) -> bytes:
    lay = snap.layout
    fp = lay.fingerprint.encode("utf-8")
    if len(fp) > 0xFFFF:
        raise ValueError("model fingerprint longer than 65535 bytes")
    return _HEADER.pack(MAGIC, LAYOUT_VERSION, DTYPE_CODES[lay.k_dtype], DTYPE_CODES[lay.v_dtype],
                        int(lay.rotation), 0, lay.rotation_group, lay.rotation_seed,
                        lay.n_layers, lay.n_kv_heads, lay.head_dim, 0, snap.length, len(fp)) + fp


def save(snap: KVSnapshot, path: str | os.PathLike[str]) -> None:
    """Write ``snap`` to ``path`` atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in (memoryview(_header(snap)),
                         memoryview(np.ascontiguousarray(snap.k).reshape(-1)),
                         memoryview(np.ascontiguousarray(snap.v).reshape(-1))):
                h.update(part)
                f.write(part)
            f.write(h.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_exact(f, n: int, h: "hashlib._Hash", what: str, path: Path) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise SnapshotError(f"KV snapshot {path} is truncated (ends inside the {what})",
                            remedy="the file was cut short; take a new snapshot")
    h.update(b)
    return b


def load(path: str | os.PathLike[str]) -> KVSnapshot:
    """Read and verify a snapshot file; SnapshotError if it is not one, truncated or corrupt."""
    path = Path(path)
    remedy = "the file is damaged or not a luce KV snapshot; take a new snapshot"
    h = hashlib.sha256()
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SnapshotError(f"cannot open KV snapshot {path}: {e.strerror}",
                            remedy="check the path") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(MAGIC))
        if not head:
            raise SnapshotError(f"KV snapshot {path} is empty", remedy=remedy)
        if head != MAGIC[: len(head)]:
            raise SnapshotError(f"{path} is not a luce KV snapshot (bad magic)", remedy=remedy)
        h.update(head)
        rest = _read_exact(f, _HEADER.size - len(MAGIC), h, "header", path)
        (_, version, kc, vc, rot, _, group, seed, n_layers, n_kv_heads, head_dim, _, length,
         fp_len) = _HEADER.unpack(head + rest)
        if version != LAYOUT_VERSION:
            raise SnapshotError(f"KV snapshot {path} has layout version {version}; this luce reads "
                                f"version {LAYOUT_VERSION}", remedy="take a new snapshot with this luce")
        if kc not in _CODE_DTYPES or vc not in _CODE_DTYPES or rot > 1:
            raise SnapshotError(f"KV snapshot {path} has a corrupt header (dtype codes {kc}/{vc}, "
                                f"rotation flag {rot})", remedy=remedy)
        try:
            fingerprint = _read_exact(f, fp_len, h, "header", path).decode("utf-8")
            layout = KVLayout(_CODE_DTYPES[kc], _CODE_DTYPES[vc], bool(rot), seed, group,
                              n_layers, n_kv_heads, head_dim, fingerprint)
            kshape, vshape = layout.payload_shapes(length)
        except (UnicodeDecodeError, ConfigError) as e:
            raise SnapshotError(f"KV snapshot {path} has a corrupt header ({e})", remedy=remedy) from None
        nk, nv = math.prod(kshape), math.prod(vshape)
        expected = _HEADER.size + fp_len + nk + nv + _DIGEST
        if size < expected:
            raise SnapshotError(f"KV snapshot {path} is truncated: {size} bytes, its header "
                                f"announces {expected}", remedy=remedy)
        if size > expected:
            raise SnapshotError(f"KV snapshot {path} is corrupt: {size - expected} unexpected trailing "
                                f"bytes", remedy=remedy)
        payload = []
        for n, shape in ((nk, kshape), (nv, vshape)):
            buf = np.empty(n, dtype=np.uint8)
            view = memoryview(buf)
            off = 0
            while off < n:
                got = f.readinto(view[off:off + _CHUNK])
                if not got:
                    raise SnapshotError(f"KV snapshot {path} is truncated (file shrank while reading)",
                                        remedy=remedy)
                h.update(view[off:off + got])
                off += got
            payload.append(buf.reshape(shape))
        if f.read(_DIGEST) != h.digest():
            raise SnapshotError(f"KV snapshot {path} is corrupt: checksum mismatch", remedy=remedy)
    return KVSnapshot(layout, length, payload[0], payload[1])

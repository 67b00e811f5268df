"""GGUF fuzzing: mutated small synthetic GGUFs must give a LuceError or a correctly loaded model.

Each example writes one mutation of a tiny llama GGUF (2 layers, 380 KB) and loads it in-process
through the loader role object under a time cap (SIGALRM) and an address-space cap. Mutation
classes: ``truncate`` (cut anywhere), ``flip`` (byte flips in the header, metadata or tensor table),
``table`` (crafted tensor-table fields: offsets shifted, overlapping, zeroed, misaligned; types,
dims and counts changed), ``header`` (huge metadata/tensor counts, string and array lengths, many
keys, nested arrays, duplicate keys) and ``kv`` (hyper-parameters of the wrong type or outside
their range: NaN/inf/0/-1 RoPE base and epsilon, block_count mismatch, huge names, ...).

The outcome is acceptable when it is a LuceError whose message is bounded and names no raw Python
exception, or a model whose tensors are byte-for-byte the original's (same names, types, shapes)
and whose hyper-parameters are sane. A flipped metadata value can be another valid model (a GGUF
has no checksum), so only those two properties are asked of a load.

CI runs ``LUCE_FUZZ_EXAMPLES`` (default 500, ~10 s) examples; a nightly-sized run:
``LUCE_FUZZ_EXAMPLES=5000 python -m pytest -q -p no:cacheprovider tests/test_gguf_fuzz.py``.
"""
from __future__ import annotations

import math
import os
import re
import resource
import signal
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.contract.errors import LuceError
from luce_gguf.loader import GGUFLoader
from luce_tools.models.synth import write_synthetic_gguf

SMALL = dict(arch="llama", hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn=128, vocab=300)
EXAMPLES = int(os.environ.get("LUCE_FUZZ_EXAMPLES", "500"))
TIME_CAP_S = 5.0
MEMORY_CAP = 2 << 30  # bytes of address space a case may add
MAX_MESSAGE = 700
RAW = re.compile(r"\b(\w+Error|\w+Exception|KeyError|Traceback|struct\.error)\b(?=[:(']|$| )")
# error class names luce itself raises may appear; raw Python ones may not
ALLOWED = {"ModelFileError", "UnsupportedModelError", "LuceError", "ConfigError", "TemplateError"}


class Hang(BaseException):  # not an Exception: no handler in the loader may swallow it
    pass


@contextmanager
def capped() -> Iterator[None]:
    """Raise Hang after TIME_CAP_S and MemoryError past MEMORY_CAP more bytes of address space."""
    def alarm(signum: int, frame: Any) -> None:
        raise Hang()

    old_handler = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_CAP, hard))
    signal.setitimer(signal.ITIMER_REAL, TIME_CAP_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old_handler)


# ----------------------------------------------------------------------------- the base file
class Base:
    """The unmutated file, its loaded model and its byte layout."""

    def __init__(self, folder: Path):
        import gguf

        self.folder = folder
        self.path = folder / "base.gguf"
        write_synthetic_gguf(self.path, **SMALL, return_weights=False)
        self.bytes = self.path.read_bytes()
        self.model = load(self.path)
        r = gguf.GGUFReader(str(self.path))
        self.data_offset = int(r.data_offset)
        self.fields = {k: int(f.offset) for k, f in r.fields.items()}
        self.field_value = {}  # key -> offset of its value (after key length, key, type)
        for k, f in r.fields.items():
            if not k.startswith("GGUF."):
                self.field_value[k] = int(f.offset) + 8 + len(k.encode()) + 4
        self.table = []  # per tensor: (name, type offset, data-offset offset, n_dims offset, type)
        for t in r.tensors:
            at = int(t.field.offset) + 8 + len(t.name.encode())
            n_dims = len(t.shape)
            self.table.append((t.name, at + 4 + 8 * n_dims, at + 4 + 8 * n_dims + 4, at, t.tensor_type.name,
                               int(t.data_offset) - self.data_offset))


def load(path: Path) -> Any:
    return GGUFLoader(Caps(), RunConfig(model_path=str(path))).load(str(path))


def _u64(data: bytearray, at: int, value: int) -> None:
    data[at:at + 8] = struct.pack("<Q", value % (1 << 64))


def _u32(data: bytearray, at: int, value: int) -> None:
    data[at:at + 4] = struct.pack("<I", value % (1 << 32))


def _insert_kv(base: Base, records: bytes, n: int) -> bytes:
    """Insert ``n`` raw metadata records after the header, padded (with one more string record)
    so that the data section keeps its alignment."""
    pad_key = b"pad"
    fixed = 8 + len(pad_key) + 4 + 8
    extra = (-(len(records) + fixed)) % 32
    records += struct.pack("<Q", len(pad_key)) + pad_key + struct.pack("<IQ", 8, extra) + b"x" * extra
    data = bytearray(base.bytes)
    _u64(data, 16, struct.unpack_from("<Q", data, 16)[0] + n + 1)
    return bytes(data[:24] + records + data[24:])


# ----------------------------------------------------------------------------- mutations
def truncate(base: Base, frac: float) -> bytes:
    return base.bytes[: int(len(base.bytes) * frac)]


def flip(base: Base, at: int, mask: int) -> bytes:
    data = bytearray(base.bytes)
    data[at] ^= mask
    return bytes(data)


def table(base: Base, kind: str, index: int, value: int) -> bytes:
    data = bytearray(base.bytes)
    name, type_at, off_at, ndims_at, qtype, offset = base.table[index % len(base.table)]
    if kind == "offset_shift":
        _u64(data, off_at, offset + value)
    elif kind == "offset_overlap":
        prev = base.table[(index - 1) % len(base.table)]
        _u64(data, off_at, prev[5])
    elif kind == "offsets_zero":
        for entry in base.table:
            _u64(data, entry[2], 0)
    elif kind == "offset_huge":
        _u64(data, off_at, value << 40)
    elif kind == "type":
        _u32(data, type_at, value)
    elif kind == "n_dims":
        _u32(data, ndims_at, value)
    elif kind == "dim":
        _u64(data, ndims_at + 4, value)
    elif kind == "tensor_count":
        _u64(data, 8, len(base.table) + value)
    elif kind == "f32_as_f16":
        f32 = [e for e in base.table if e[4] == "F32"]
        _u32(data, f32[index % len(f32)][1], 1)
    elif kind == "no_padding":  # data written right after the tensor table
        end = base.table[-1][2] + 8  # the last tensor info ends with its 8-byte offset
        return bytes(data[:end] + data[base.data_offset:])
    return bytes(data)


def header(base: Base, kind: str, value: int) -> bytes:
    data = bytearray(base.bytes)
    if kind == "kv_count":
        _u64(data, 16, value)
    elif kind == "tensor_count_huge":
        _u64(data, 8, value)
    elif kind == "key_length":
        _u64(data, base.fields["general.name"], value)
    elif kind == "string_length":
        _u64(data, base.field_value["general.name"], value)
    elif kind == "array_count":
        _u64(data, base.field_value["tokenizer.ggml.tokens"] + 4, value)
    elif kind == "value_type":
        _u32(data, base.field_value["general.name"] - 4, value)
    elif kind == "many_keys":
        n = value
        recs = b"".join(struct.pack("<Q", 7) + b"k%06d" % i + struct.pack("<IB", 0, 1) for i in range(n))
        return _insert_kv(base, recs, n)
    elif kind == "nested_arrays":
        n = value
        rec = struct.pack("<Q", 6) + b"nested" + struct.pack("<IIQ", 9, 9, n) + struct.pack("<IQ", 4, 0) * n
        return _insert_kv(base, rec, 1)
    elif kind == "duplicate_key":
        rec = struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, 5) + b"llama"
        return _insert_kv(base, rec, 1)
    elif kind == "bad_utf8_key":
        at = base.fields["general.name"] + 8
        data[at:at + 2] = b"\xff\xfe"
    elif kind == "version":
        _u32(data, 4, value)
    return bytes(data)


_KV_CASES: dict[str, list[Any]] = {
    "llama.block_count": [0, 1, 3, 10**6, 10**9, 2**32 - 1, "2", 2.0],
    "llama.rope.freq_base": [0.0, -1.0, math.nan, math.inf, -math.inf, "10000"],
    "llama.attention.layer_norm_rms_epsilon": [0.0, -1.0, math.nan, math.inf, 2.0],
    "llama.embedding_length": ["64", 64.0, 0, 2**31, [64]],
    "llama.attention.head_count": [0, 3, 5, 2**31, "4"],
    "llama.attention.head_count_kv": [0, 3, 8],
    "llama.attention.key_length": [0, 15, 2**20],
    "llama.feed_forward_length": [0, 127, "x"],
    "llama.context_length": [0, 2**40, "ctx"],
    "llama.rope.dimension_count": [0, 15, 18, 2**31],
    "llama.rope.scaling.type": ["yarn", "x" * 10_000, 3],
    "llama.rope.scaling.factor": [0.0, -1.0, math.nan, math.inf, 4.0],
    "general.architecture": ["x" * 10_000, "gptneox", ""],
    "general.alignment": [0, 1, 3, 8, 64, 2**31, -1, "32"],
    "tokenizer.ggml.tokens": [7, "one", [1, 2, 3]],
    "tokenizer.ggml.token_type": [[1] * 5, "x", 1],
    "tokenizer.ggml.merges": [3, ["nospace"], [1, 2]],
    "tokenizer.ggml.bos_token_id": [-1, 10**6, "1", 1.5],
    "tokenizer.ggml.model": [1, "x" * 10_000],
    "tokenizer.chat_template": [7, "{% for %}", "{{ " * 5000],
}


def kv(base: Base, key: str, value: Any) -> bytes:
    """The base file with metadata ``key`` set to ``value``, stored with the value's own type
    (a string where the key holds an integer, say); a new int key is a UINT32 when it fits."""
    import gguf

    from luce_tools.models.writer import StreamWriter

    src = gguf.GGUFReader(str(base.path))
    arch = value if key == "general.architecture" else "llama"
    out = StreamWriter(base.folder / "kv.tmp.gguf", arch)
    extra = {"llama.rope.scaling.type": "linear"} if key == "llama.rope.scaling.factor" else {}
    updates = {key: value, **extra}
    for k, field in src.fields.items():
        if not k.startswith("GGUF.") and k not in updates:
            main = field.types[0]
            out.add(k, field.contents(), main, field.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    for k, v in updates.items():
        out.add(k, v)
    for t in src.tensors:
        out.add_tensor(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name,
                       lambda t=t: t.data.view(np.uint8))
    out.write()
    return Path(out.path).read_bytes()


# ----------------------------------------------------------------------------- outcomes
def outcome(base: Base, data: bytes) -> str:
    """'ok' or what went wrong: 'raw' (an exception that is not a clean LuceError), 'hang',
    'accepted' (loaded, but not the original model or with insane hyper-parameters)."""
    path = base.folder / "case.gguf"
    path.write_bytes(data)
    try:
        with capped():
            model = load(path)
    except Hang:
        return "hang"
    except LuceError as e:
        msg = str(e)
        names = {m for m in RAW.findall(msg)} - ALLOWED
        if len(msg) > MAX_MESSAGE or names or str(path) not in msg:
            return "raw"
        return "ok"
    except BaseException as e:  # noqa: BLE001 - the point is to see every escape
        if isinstance(e, KeyboardInterrupt):
            raise
        return "raw"
    return "ok" if _same_model(base.model, model) else "accepted"


def _same_model(ref: Any, got: Any) -> bool:
    if set(ref.tensors) != set(got.tensors):
        return False
    for name, t in ref.tensors.items():
        g = got.tensors[name]
        if (g.qtype, g.shape) != (t.qtype, t.shape) or not np.array_equal(np.asarray(g.data), np.asarray(t.data)):
            return False
    c = got.config
    return (math.isfinite(c.rope_base) and c.rope_base > 0 and math.isfinite(c.rms_eps) and 0 < c.rms_eps < 1
            and math.isfinite(c.rope_factor) and c.rope_factor > 0
            and (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab)
            == (ref.config.n_layers, ref.config.hidden, ref.config.n_heads, ref.config.n_kv_heads,
                ref.config.head_dim, ref.config.ffn, ref.config.vocab))


# ----------------------------------------------------------------------------- strategies
def cases(base_size: int, data_offset: int, n_tensors: int) -> st.SearchStrategy[tuple[str, Callable, tuple]]:
    trunc = st.tuples(st.just("truncate"), st.just(truncate), st.tuples(st.floats(0, 0.9999)))
    flips = st.tuples(st.just("flip"), st.just(flip),
                      st.tuples(st.integers(0, data_offset - 1), st.integers(1, 255)))
    tab = st.tuples(st.just("table"), st.just(table), st.one_of(
        st.tuples(st.just("offset_shift"), st.integers(0, n_tensors - 1), st.sampled_from([1, 3, 16, -32, 32, 4096])),
        st.tuples(st.sampled_from(["offset_overlap", "offset_huge", "f32_as_f16"]), st.integers(1, n_tensors - 1),
                  st.just(1)),
        st.tuples(st.just("offsets_zero"), st.just(0), st.just(0)),
        st.tuples(st.just("no_padding"), st.just(0), st.just(0)),
        st.tuples(st.just("type"), st.integers(0, n_tensors - 1), st.sampled_from([1, 4, 5, 99, 2**31])),
        st.tuples(st.just("n_dims"), st.integers(0, n_tensors - 1), st.sampled_from([0, 3, 5, 2**31])),
        st.tuples(st.just("dim"), st.integers(0, n_tensors - 1), st.sampled_from([0, 1, 2**40, 2**63 + 5])),
        st.tuples(st.just("tensor_count"), st.just(0), st.sampled_from([-1, 1, -5])),
    ))
    head = st.tuples(st.just("header"), st.just(header), st.one_of(
        st.tuples(st.sampled_from(["kv_count", "tensor_count_huge", "key_length", "string_length", "array_count"]),
                  st.sampled_from([10**6, 10**9, 2**32 - 1, 2**63, 2**64 - 1])),
        st.tuples(st.just("value_type"), st.sampled_from([13, 99, 9])),
        st.tuples(st.just("many_keys"), st.sampled_from([2_000, 200_000])),
        st.tuples(st.just("nested_arrays"), st.sampled_from([1, 100_000])),
        st.tuples(st.sampled_from(["duplicate_key", "bad_utf8_key"]), st.just(0)),
        st.tuples(st.just("version"), st.sampled_from([0, 1, 4, 2**31])),
    ))
    kvs = st.tuples(st.just("kv"), st.just(kv),
                    st.sampled_from([(k, v) for k, vs in _KV_CASES.items() for v in vs]))
    return st.one_of(trunc, flips, tab, head, kvs)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return Base(tmp_path_factory.mktemp("fuzz"))


def test_base_loads(base: Base) -> None:
    assert outcome(base, base.bytes) == "ok"


def test_mutations(base: Base) -> None:
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(len(base.bytes), base.data_offset, len(base.table)))
    def check(case: tuple[str, Callable, tuple]) -> None:
        cls, mutate, args = case
        seen[cls] = seen.get(cls, 0) + 1
        result = outcome(base, mutate(base, *args))
        assert result == "ok", (cls, args if cls != "kv" else (args[0], str(args[1])[:40]), result)

    check()
    assert set(seen) == {"truncate", "flip", "table", "header", "kv"}, seen

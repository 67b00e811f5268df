"""The GGUF loader: the real SmolLM2 file, memory mapping, and every kind of bad input."""
from __future__ import annotations

import mmap
import subprocess
import sys

import numpy as np
import pytest

from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.contract.errors import ModelFileError, UnsupportedModelError
from luce_gguf.loader import GGUFLoader, load_gguf
from luce_tools.models.synth import write_synthetic_gguf
from luce_tools.models.writer import rewrite_gguf

SMALL = dict(arch="llama", hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn=128, vocab=300)


@pytest.fixture(scope="module")
def smollm(smollm2_path):
    return GGUFLoader(Caps(), RunConfig(model_path=str(smollm2_path))).load(str(smollm2_path))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_synthetic_gguf(path, **SMALL, return_weights=False)
    return path


# ----------------------------------------------------------------------------- plugin descriptor
def test_plugin_imports_nothing_heavy():
    code = ("import sys, luce_gguf.plugin; "
            "print(sorted(m for m in ('numpy', 'gguf', 'torch', 'tokenizers', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plugin_claims_only_gguf(smollm2_path, tmp_path):
    from luce_gguf.plugin import provide_loader

    (impl,) = provide_loader()
    assert (impl.role, impl.name, impl.factory) == ("loader", "gguf", "luce_gguf.loader:GGUFLoader")
    caps = Caps()
    assert impl.reasons(caps, RunConfig(model_path=str(smollm2_path))) == []
    text = tmp_path / "model.bin"
    text.write_bytes(b"PK\x03\x04 not a gguf")
    assert impl.reasons(caps, RunConfig(model_path=str(text))) == \
        ["not a GGUF file (it starts with b'PK\\x03\\x04', a GGUF with b'GGUF')"]
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert impl.reasons(caps, RunConfig(model_path=str(empty))) == ["the file is empty (0 bytes)"]
    assert impl.reasons(caps, RunConfig(model_path=str(tmp_path))) == [f"a directory, not a model file: {tmp_path}"]
    missing = tmp_path / "absent.gguf"
    assert impl.reasons(caps, RunConfig(model_path=str(missing))) == [f"file not found: {missing}"]
    assert impl.reasons(caps, RunConfig(model_path="")) == ["no model path given"]


def test_selected_through_entry_points(smollm2_path):
    from luce_core import plugin_host, selection

    impls = plugin_host.host().impls("loader")
    assert "gguf" in [i.name for i in impls]
    config = RunConfig(model_path=str(smollm2_path))
    chosen = selection.select("loader", impls, Caps(), config)
    assert chosen.name == "gguf" and isinstance(chosen.create(Caps(), config), GGUFLoader)


# ----------------------------------------------------------------------------- the real model
def test_smollm2_config(smollm):
    c = smollm.config
    assert (c.arch, c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 1536, 9, 3, 64)
    assert (c.vocab, c.ctx_train, c.rope_base, c.rms_eps, c.rope_dim) == (49152, 8192, 100000.0, 1e-5, 64)
    assert c.rope_style == "normal" and c.rope_scaling == "none" and c.rope_factor == 1.0
    assert c.tied_embeddings and not c.qkv_bias and not c.qk_norm
    assert smollm.tokenizer.vocab_size == 49152


def test_smollm2_tensors(smollm):
    t = smollm.tensors
    assert "output.weight" not in t and len(t) == 2 + 30 * 9
    emb, k, norm = t["token_embd.weight"], t["blk.7.attn_k.weight"], t["blk.7.attn_norm.weight"]
    assert (emb.qtype, emb.shape, emb.data.shape) == ("Q8_0", (49152, 576), (49152, 612))
    assert (k.qtype, k.shape, k.data.shape) == ("Q4_1", (192, 576), (192, 360))
    assert (norm.qtype, norm.shape, norm.data.shape, norm.data.dtype) == ("F32", (576,), (1, 2304), np.uint8)
    assert all(q.scale == 1.0 for q in t.values())


def test_smollm2_tensors_are_views_of_the_file(smollm, smollm2_path):
    from luce_gguf.reader import _reader_class  # parses like gguf.GGUFReader (tested below), faster

    for name in ("token_embd.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
        data = smollm.tensors[name].data
        chain, b = [], data
        while isinstance(b, np.ndarray):
            chain.append(b)
            b = b.base
        assert isinstance(b, mmap.mmap) and any(isinstance(a, np.memmap) for a in chain)
        assert not data.flags.writeable
    # the bytes are the file's bytes at the tensor's offset (read with plain file I/O)
    reader = _reader_class()(str(smollm2_path))
    rt = next(r for r in reader.tensors if r.name == "blk.29.ffn_down.weight")
    with open(smollm2_path, "rb") as f:
        f.seek(rt.data_offset)
        raw = f.read(rt.n_bytes)
    assert smollm.tensors["blk.29.ffn_down.weight"].data.tobytes() == raw
    norm = next(r for r in reader.tensors if r.name == "output_norm.weight")
    np.testing.assert_array_equal(smollm.tensors["output_norm.weight"].data.view(np.float32).reshape(576), norm.data)


def test_smollm2_metadata_and_fingerprint(smollm, small):
    md = smollm.metadata
    assert md["arch"] == "llama" and md["file_type"] == "MOSTLY_Q4_1" and md["name"].startswith("Smollm2")
    assert md["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert 130e6 < md["n_params"] < 140e6
    assert len(smollm.fingerprint) == 32
    a, b = load_gguf(small), load_gguf(small)
    assert a.fingerprint == b.fingerprint != smollm.fingerprint


def test_fingerprint_sees_weight_changes(small, tmp_path):
    other = tmp_path / "other.gguf"
    write_synthetic_gguf(other, **SMALL, seed=1, return_weights=False)  # same shapes, other values
    assert load_gguf(other).fingerprint != load_gguf(small).fingerprint


def test_fast_reader_parses_like_gguf(small, tmp_path):
    import gguf

    from luce_gguf.reader import _reader_class

    path = tmp_path / "arrays.gguf"  # string, int32, uint32, float and bool arrays
    rewrite_gguf(small, path, kv={"test.floats": [0.5, -1.25], "test.flags": [True, False, True],
                                  "test.words": ["", "é", "a b"], "test.one": [7]})
    ref, fast = gguf.GGUFReader(str(path)), _reader_class()(str(path))
    assert list(ref.fields) == list(fast.fields)
    for key, a in ref.fields.items():
        b = fast.fields[key]
        assert a.contents() == b.contents(), key
        assert (a.offset, a.types, a.data, len(a.parts)) == (b.offset, b.types, b.data, len(b.parts)), key
        for x, y in zip(a.parts, b.parts):
            assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes()), key
    assert fast.fields["test.words"].contents() == ["", "é", "a b"]
    assert ref.data_offset == fast.data_offset
    for a, b in zip(ref.tensors, fast.tensors, strict=True):
        assert (a.name, a.tensor_type, a.data_offset, a.data.dtype) == \
            (b.name, b.tensor_type, b.data_offset, b.data.dtype)
        np.testing.assert_array_equal(a.data, b.data)


# ----------------------------------------------------------------------------- bad input
def _raises(exc, path, *fragments):
    with pytest.raises(exc) as info:
        load_gguf(path)
    msg = str(info.value)
    for frag in (str(path), *fragments):
        assert frag in msg, (frag, msg)
    return msg


def test_missing_file(tmp_path):
    _raises(ModelFileError, tmp_path / "nope.gguf", "not found")


def test_wrong_magic(small, tmp_path):
    bad = tmp_path / "flipped.gguf"
    data = bytearray(small.read_bytes())
    data[:4] = b"GGML"
    bad.write_bytes(bytes(data))
    _raises(ModelFileError, bad, "not a GGUF file", "b'GGML'")


@pytest.mark.parametrize("keep,where", [(0.6, "tensor 'blk.0."), (0.02, "tensor 'token_embd.weight'"),
                                        (0.001, "more than the rest of the file can hold")])
def test_truncated_synthetic(small, tmp_path, keep, where):
    bad = tmp_path / "cut.gguf"
    data = small.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    _raises(ModelFileError, bad, "truncated", where)


def test_truncated_real_file(smollm2_path, tmp_path):
    bad = tmp_path / "smollm2-cut.gguf"
    with open(smollm2_path, "rb") as src:
        bad.write_bytes(src.read(1 << 20))  # ends inside the vocabulary
    _raises(ModelFileError, bad, "truncated", "tokenizer.ggml.merges")


def test_garbage_after_magic(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises(ModelFileError, bad, "corrupt")


def test_unknown_architecture(small, tmp_path):
    bad = tmp_path / "neox.gguf"
    rewrite_gguf(small, bad, kv={"general.architecture": "gptneox"})
    _raises(UnsupportedModelError, bad, "'gptneox'", "llama, qwen2, qwen3")


def test_unsupported_tensor_type(small, tmp_path):
    bad = tmp_path / "q5.gguf"
    w = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32)
    rewrite_gguf(small, bad, tensors={"blk.1.attn_q.weight": (w, "Q5_0")})
    msg = _raises(UnsupportedModelError, bad, "blk.1.attn_q.weight", "Q5_0")
    assert "Q4_K" in msg  # the supported list comes with it


def test_missing_tensor(small, tmp_path):
    bad = tmp_path / "dropped.gguf"
    rewrite_gguf(small, bad, drop=["blk.1.ffn_up.weight"])
    _raises(ModelFileError, bad, "blk.1.ffn_up.weight", "missing")


def test_misshapen_tensor(small, tmp_path):
    bad = tmp_path / "shape.gguf"
    w = np.zeros((96, 64), dtype=np.float32)  # attn_q must be [64, 4*16] (ne order)
    rewrite_gguf(small, bad, tensors={"blk.0.attn_q.weight": (w, "F32")})
    _raises(ModelFileError, bad, "blk.0.attn_q.weight", "[64, 96]", "[64, 64]")


def test_unsupported_tokenizer(small, tmp_path):
    bad = tmp_path / "spm.gguf"
    rewrite_gguf(small, bad, kv={"tokenizer.ggml.model": "llama"})
    _raises(UnsupportedModelError, bad, "tokenizer model 'llama'")


def test_unknown_rope_scaling(small, tmp_path):
    bad = tmp_path / "rope.gguf"
    rewrite_gguf(small, bad, kv={"llama.rope.scaling.type": "longrope"})
    _raises(UnsupportedModelError, bad, "'longrope'")


def test_rope_scaling_metadata(small, tmp_path):
    scaled = tmp_path / "linear.gguf"
    rewrite_gguf(small, scaled, kv={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    c = load_gguf(scaled).config
    assert (c.rope_scaling, c.rope_factor) == ("linear", 4.0)
    freqs = tmp_path / "llama3.gguf"
    rewrite_gguf(small, freqs, tensors={"rope_freqs.weight": (np.ones(8, np.float32), "F32")})
    m = load_gguf(freqs)
    assert m.config.rope_scaling == "llama3" and m.tensors["rope_freqs.weight"].shape == (8,)


def test_errors_through_the_loader_object(tmp_path):
    loader = GGUFLoader(Caps(), RunConfig())
    with pytest.raises(ModelFileError, match="not found"):
        loader.load(str(tmp_path / "x.gguf"), RunConfig())


# ----------------------------------------------------------------------------- NVFP4 scales
def test_nvfp4_scale_is_folded(small, tmp_path):
    import gguf

    path = tmp_path / "nvfp4.gguf"
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (128, 36), dtype=np.uint8)  # ffn_up [128, 64]: one 64-block a row
    blocks[:, :4] &= 0x7E  # the four UE4M3 sub-block scales: finite (0x7F is NaN)
    rewrite_gguf(small, path, tensors={"blk.0.ffn_up.weight": (blocks, "NVFP4"),
                                       "blk.0.ffn_up.weight.scale": (np.array([0.0625], np.float32), "F32")})
    m = load_gguf(path)
    assert not any(n.endswith(".scale") for n in m.tensors)
    q = m.tensors["blk.0.ffn_up.weight"]
    assert (q.qtype, q.shape, q.scale) == ("NVFP4", (128, 64), 0.0625)
    np.testing.assert_array_equal(q.data, blocks)
    assert m.tensors["blk.1.ffn_up.weight"].scale == 1.0
    noscale = tmp_path / "noscale.gguf"
    rewrite_gguf(path, noscale, drop=["blk.0.ffn_up.weight.scale"])
    _raises(ModelFileError, noscale, "blk.0.ffn_up.weight", "scale")
    twoscale = tmp_path / "twoscale.gguf"
    rewrite_gguf(path, twoscale, tensors={"blk.0.ffn_up.weight.scale": (np.ones(2, np.float32), "F32")})
    _raises(ModelFileError, twoscale, "blk.0.ffn_up.weight.scale", "one F32 value")
    assert gguf.GGMLQuantizationType.NVFP4  # the gguf version luce pins knows the type


# ----------------------------------------------------------------------------- CLI: the wrong file
def _generate(model: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luce_core.cli", "generate", "--model", model, "-n", "1", "hi"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["not-gguf", "empty", "directory", "truncated"])
def test_cli_names_the_file_and_the_cause(small, tmp_path, kind):
    """A wrong file is a file error naming it (remedy: the right file), never "no loader
    implementation can run here" with `luce doctor` as the remedy, and never a traceback."""
    target = tmp_path / "model.gguf"
    if kind == "not-gguf":
        target.write_bytes(b"PK\x03\x04" + bytes(200))
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "directory":
        target.mkdir()
    else:
        target.write_bytes(small.read_bytes()[:50_000])
    proc = _generate(str(target))
    err = proc.stderr
    assert proc.returncode != 0 and str(target) in err, err
    assert "Traceback" not in err and "luce doctor" not in err and "can run here" not in err, err
    cause = {"not-gguf": "not a GGUF file", "empty": "empty", "directory": "directory", "truncated": "truncated"}
    assert cause[kind] in err and "remedy" in err, err

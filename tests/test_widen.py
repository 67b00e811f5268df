"""Function-preserving widening: the padded model's logits equal the original's, its original
weight blocks keep their bits, and shapes it cannot reach are refused with a reason."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import luce
from hf_oracle import compare, luce_logits
from luce_core.contract.errors import ConfigError, UnsupportedModelError
from luce_gguf.reader import open_gguf
from luce_tools.models.synth import write_synthetic_gguf
from luce_tools.models.widen import main, widen_gguf

F32 = dict(device="cpu", dtype="f32", kv_k="f32", kv_v="f32", progress=False)
SHAPE = dict(hidden=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn=128)
WIDE = dict(hidden=192, ffn=224, n_heads=9, n_kv_heads=3)  # 2 -> 3 heads per KV head
IDS = [5, 17, 300, 42, 42, 7, 128, 64, 3, 255, 11, 90]


def logits(path) -> torch.Tensor:
    return luce_logits(luce.load(path, **F32), IDS)


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_1"), ("qwen2", "Q8_0"), ("qwen3", "F16")])
def test_widened_synthetic_computes_the_same_logits(tmp_path, arch, qtype, one_torch_thread):
    src, dst = tmp_path / "src.gguf", tmp_path / "wide.gguf"
    write_synthetic_gguf(src, arch=arch, qtype=qtype, seed=1, return_weights=False, **SHAPE)
    widen_gguf(src, dst, **WIDE)
    cfg = luce.load(dst, **F32).config
    assert (cfg.hidden, cfg.ffn, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (192, 224, 9, 3, 32)
    a = compare(logits(src), logits(dst))
    # logits of magnitude ~1; llama/qwen2 differ only in summation order (measured 4e-7). qwen3's
    # per-head Q/K norms share the file's one epsilon, which widening scales (measured 5.3e-5).
    assert a.max_abs < (2e-4 if arch == "qwen3" else 2e-6), a


def test_widened_blocks_keep_their_bits(tmp_path):
    src, dst = tmp_path / "src.gguf", tmp_path / "wide.gguf"
    write_synthetic_gguf(src, arch="llama", qtype="Q4_1", seed=2, return_weights=False, **SHAPE)
    widen_gguf(src, dst, **WIDE)
    a, b = open_gguf(src), open_gguf(dst)
    q, wq = a.qtensor("blk.1.attn_q.weight"), b.qtensor("blk.1.attn_q.weight")
    # head 3 = KV group 1, second head -> new head 1 * 3 + 1 = 4; 32 rows of 32-dim heads, 4 blocks of 20 bytes
    assert np.array_equal(wq.data[4 * 32:5 * 32, :80], q.data[3 * 32:4 * 32])
    assert not wq.data[4 * 32:5 * 32, 80:].any()  # the new hidden columns are zero blocks
    assert not wq.data[2 * 32:3 * 32].any()  # new head 2 (group 0's third) is all zero
    o, wo = a.qtensor("blk.0.attn_output.weight"), b.qtensor("blk.0.attn_output.weight")
    assert np.array_equal(wo.data[:128, 4 * 20:5 * 20], o.data[:, 3 * 20:4 * 20])  # head 3's column blocks
    norm = b.qtensor("blk.0.attn_norm.weight").data.view(np.float32)
    orig = a.qtensor("blk.0.attn_norm.weight").data.view(np.float32)
    np.testing.assert_allclose(norm.reshape(-1)[:128], orig.reshape(-1) * np.sqrt(128 / 192), rtol=1e-6)
    assert b.get("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5 * 128 / 192)


def test_widened_smollm2_matches_smollm2(tmp_path, smollm2_path):
    """The real model: 30 layers of its own Q4_1 blocks, padded 576 -> 640, 9/3 -> 12/3 heads."""
    dst = tmp_path / "wide.gguf"
    widen_gguf(smollm2_path, dst, hidden=640, ffn=1600, n_heads=12, n_kv_heads=3)
    a = compare(logits(smollm2_path), logits(dst))
    assert a.max_abs < 5e-4, a  # logits ~20; as the HF oracle's tolerance on the same model
    assert a.argmax_agree == 1.0


@pytest.mark.parametrize("shape,error,words", [
    (dict(WIDE, hidden=96), ConfigError, "cannot widen"),  # narrower
    (dict(WIDE, n_heads=3, n_kv_heads=3), ConfigError, "heads per kv head"),  # 1 slot for 2 heads
    (dict(WIDE, hidden=200), ConfigError, "straddle"),  # not whole 32-element blocks
    (dict(WIDE, n_kv_heads=0), ConfigError, "positive"),
])
def test_unreachable_shapes_are_refused(tmp_path, shape, error, words):
    src = tmp_path / "src.gguf"
    write_synthetic_gguf(src, arch="llama", qtype="Q4_1", seed=0, return_weights=False, **SHAPE)
    with pytest.raises(error, match=words):
        widen_gguf(src, tmp_path / "wide.gguf", **shape)
    assert not (tmp_path / "wide.gguf").exists()


def test_nvfp4_is_refused_and_the_cli_says_why(tmp_path, capsys):
    src = tmp_path / "src.gguf"
    write_synthetic_gguf(src, arch="llama", qtype="NVFP4", seed=0, return_weights=False,
                         **dict(SHAPE, head_dim=64, n_heads=2, n_kv_heads=1))
    with pytest.raises(UnsupportedModelError, match="NVFP4"):
        widen_gguf(src, tmp_path / "w.gguf", hidden=256, ffn=256, n_heads=4, n_kv_heads=2)
    assert main([str(src), str(tmp_path / "w.gguf"), "--hidden", "256", "--ffn", "256", "--heads", "4",
                 "--kv-heads", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("luce: error: ") and "NVFP4" in err
    assert main([str(src), str(tmp_path / "w.gguf"), "--hidden", "256", "--quiet"]) == 2  # no full shape
    assert "give --preset or --ffn, --heads, --kv-heads" in capsys.readouterr().err


def test_widening_can_restore_matrices_in_another_type(tmp_path):
    """--qtype F16: every matrix is stored as F16 (an unquantized model of the new size); the
    Q4_1 values round to F16 once, so the logits move only by that rounding."""
    src, dst = tmp_path / "src.gguf", tmp_path / "wide.gguf"
    write_synthetic_gguf(src, arch="llama", qtype="Q4_1", seed=4, return_weights=False, **SHAPE)
    assert main([str(src), str(dst), "--hidden", "192", "--ffn", "224", "--heads", "9", "--kv-heads", "3",
                 "--qtype", "F16", "--quiet"]) == 0
    f = open_gguf(dst)
    assert {f.qtype(n) for n in f.tensors if len(f.logical_shape(n)) == 2} == {"F16"}
    a = compare(logits(src), logits(dst))
    assert 0 < a.max_abs < 2e-3 and a.argmax_agree == 1.0, a

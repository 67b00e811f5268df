"""Layer truncation (a self-draft model): the kept layers compute what they computed in the full
model, blocks keep their bits, the tokenizer is the original's, and bad layer lists are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import luce
from hf_oracle import luce_logits
from luce_core.contract.errors import ConfigError
from luce_gguf.reader import open_gguf
from luce_tools.models.synth import write_synthetic_gguf
from luce_tools.models.truncate import main, parse_layers, truncate_gguf
from luce_tools.models.writer import rewrite_gguf

F32 = dict(device="cpu", dtype="f32", kv_k="f32", kv_v="f32", progress=False)
SHAPE = dict(hidden=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, ffn=128)
IDS = [5, 17, 300, 42, 42, 7, 128, 64, 3, 255, 11, 90]


def logits(path) -> torch.Tensor:
    return luce_logits(luce.load(path, **F32), IDS)


def test_parse_layers():
    assert parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert parse_layers("3, 1", 8) == [1, 3]
    for bad in ("0-8", "2-1", "a", ""):
        with pytest.raises(ConfigError):
            parse_layers(bad, 8)


@pytest.mark.parametrize("qtype", ["Q4_1", "F16"])
def test_dropped_layer_is_a_layer_that_adds_nothing(tmp_path, qtype, one_torch_thread):
    """Oracle: the full model with layer 1's output projections zeroed (its residual updates
    vanish) computes what the model of layers 0 and 2 computes."""
    src, cut, zeroed = tmp_path / "src.gguf", tmp_path / "cut.gguf", tmp_path / "zeroed.gguf"
    write_synthetic_gguf(src, arch="llama", qtype=qtype, seed=3, return_weights=False, **SHAPE)
    truncate_gguf(src, cut, [0, 2])
    f = open_gguf(src)
    zero = {name: (np.zeros_like(f.qtensor(name).data), f.qtensor(name).qtype)
            for name in ("blk.1.attn_output.weight", "blk.1.ffn_down.weight")}
    rewrite_gguf(src, zeroed, tensors=zero)
    assert luce.load(cut, **F32).config.n_layers == 2
    a, b, full = logits(cut), logits(zeroed), logits(src)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - full).abs().max() > 1e-2  # the dropped layer did matter
    g, c = open_gguf(src), open_gguf(cut)
    assert np.array_equal(c.qtensor("blk.1.attn_q.weight").data, g.qtensor("blk.2.attn_q.weight").data)
    assert c.get("tokenizer.ggml.tokens") == g.get("tokenizer.ggml.tokens")


def test_all_layers_is_the_same_model(tmp_path, one_torch_thread):
    src, cut = tmp_path / "src.gguf", tmp_path / "cut.gguf"
    write_synthetic_gguf(src, arch="qwen2", qtype="Q8_0", seed=4, return_weights=False, **SHAPE)
    truncate_gguf(src, cut, [0, 1, 2])
    assert torch.equal(logits(src), logits(cut))


def test_cli_errors_name_the_cause(tmp_path, capsys):
    src = tmp_path / "src.gguf"
    write_synthetic_gguf(src, arch="llama", qtype="Q4_0", seed=5, return_weights=False, **SHAPE)
    assert main([str(src), str(tmp_path / "o.gguf"), "--layers", "0-3", "--quiet"]) == 2
    assert "0..2" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf"), "--layers", "0"]) == 2
    assert capsys.readouterr().err.startswith("luce: error: model file not found")
    assert main([str(src), str(tmp_path / "o.gguf"), "--layers", "1", "--quiet"]) == 0
    assert capsys.readouterr().err == f"wrote {tmp_path / 'o.gguf'} (1 layers, {(tmp_path / 'o.gguf').stat().st_size / 1e6:.1f} MB)\n"
    assert luce.load(tmp_path / "o.gguf", **F32).config.n_layers == 1


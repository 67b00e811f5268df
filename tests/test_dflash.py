"""DFlash block drafter: config, files, inference == training path, binding checks (training:
test_dflash_train.py)."""
from __future__ import annotations


import pytest
import torch

from luce_core.contract.errors import ConfigError, ModelFileError
from luce_core.contract.drafting import DrafterOptions, Target
from luce_core.generate import generate
from luce_core.sampling import Sampler, SamplingParams
from luce_core.speculative.stepper import SpeculativeStepper
from luce_core.speculative.wiring import make_drafter, stepper_for
import drafting_fixtures as fixtures
from luce_drafters.dflash.config import DFlashConfig, default_capture
from luce_drafters.dflash.files import load_drafter, save_drafter
from luce_drafters.dflash.model import DFlashModel, build_model
from luce_drafters.dflash.runtime import DFlashDrafter
from luce_tools.train_drafter.train import Head, Sequences, block_hidden, packed_batch
from luce_tools.train_drafter.train import main as train_main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dflash")
    path = fixtures.write_tiny(d / "t.gguf", seed=3, n_layers=3)
    # f32 KV: the mirror-vs-full-forward comparison below is then exact to f32 rounding
    return dict(dir=d, path=path, llm=fixtures.load(path, ctx=128, kv_k="f32", kv_v="f32"))


def _cfg(**kw) -> DFlashConfig:
    base = dict(target_hidden=64, target_vocab=300, target_layers=3, capture=(2, 3), width=32, n_layers=2,
                n_heads=2, n_kv_heads=1, head_dim=16, ffn=64, block=4, window=8)
    base.update(kw)
    return DFlashConfig(**base)


def test_default_capture_spreads_over_the_target():
    assert default_capture(30) == (2, 9, 16, 23, 30)  # outputs of layers 1, 8, 15, 22, 29
    assert default_capture(64) == (2, 17, 33, 49, 64)
    assert default_capture(2) == (2,) and default_capture(1) == (1,)
    assert default_capture(3) == (2, 3)


def test_config_rejects_bad_shapes():
    for kw, msg in [(dict(block=1), "block size must be >= 2"), (dict(block=0), "block must be a positive"),
                    (dict(capture=(4,)), "outside 0..3"), (dict(n_heads=3, n_kv_heads=2), "multiple"),
                    (dict(capture=()), "at least one"), (dict(width=-1), "width must be a positive")]:
        with pytest.raises(ConfigError, match=msg):
            _cfg(**kw)
    cfg = _cfg()
    assert DFlashConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("ext", ["safetensors", "gguf"])
def test_files_round_trip(tmp_path, ext):
    cfg = _cfg()
    m = DFlashModel(cfg)
    m.reset_parameters(1)
    path = tmp_path / f"d.{ext}"
    save_drafter(path, cfg, m)
    cfg2, state = load_drafter(path)
    assert cfg2 == cfg
    ref = m.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert torch.equal(state[k].float(), v), k
    save_drafter(tmp_path / f"h.{ext}", cfg, m, dtype="f16")
    _, half = load_drafter(tmp_path / f"h.{ext}")
    torch.testing.assert_close(build_model(cfg, half).fc.weight, m.fc.weight, atol=1e-4, rtol=1e-3)
    (tmp_path / "junk.bin").write_bytes(b"not a drafter at all")
    with pytest.raises(ModelFileError):
        load_drafter(tmp_path / "junk.bin")
    with pytest.raises(ModelFileError, match="not found"):
        load_drafter(tmp_path / "missing.safetensors")


def _drafted(llm, cfg: DFlashConfig, seed: int) -> tuple[DFlashDrafter, SpeculativeStepper, list[int]]:
    """A random drafter bound to the tiny target after a 12-token speculative generation (which
    fills the feature mirror step by step); returns it, its decoder and the committed tokens +
    the pending one."""
    dm = DFlashModel(cfg)
    dm.reset_parameters(seed)
    d = DFlashDrafter()
    d.bind_model(Target(llm.plan.model, llm.tokenizer, 128, llm.plan), cfg, dm)
    dec = stepper_for(llm.plan, llm.session, d, budget=3)
    list(generate(dec, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], 12, Sampler(SamplingParams())))
    return d, dec, dec._mirror_tokens + [llm.session.tokens[-1]]


def test_inference_path_equals_training_path(tiny):
    """The cached, incremental drafting path and the batched training path compute the same
    block logits (windowed context, absolute positions, target head)."""
    llm = tiny["llm"]
    model = llm.plan.model
    cfg = _cfg(window=6)
    d, dec, seq = _drafted(llm, cfg, seed=5)
    L = len(seq) - 1
    feats = dec.mirror.read(0, L)
    # the mirror holds what a plain full forward captures
    llm.session.truncate(0)
    full = model.forward(torch.tensor(seq[:L]), 0, llm.session.kv, capture=cfg.capture).features
    torch.testing.assert_close(feats, full, atol=1e-5, rtol=1e-5)
    data = Sequences(torch.tensor(seq)[None], torch.cat([feats, torch.zeros_like(feats[:1])])[None],
                     torch.tensor([L + 1]), torch.tensor([1]))
    head = Head(model)
    ns = (3, 9, L - 1)  # context shorter and longer than the window
    # training packs the three anchors into one row over one context; each must equal inference
    b = packed_batch(data, torch.tensor([0]), torch.tensor([ns]), torch.ones((1, 3), dtype=torch.bool),
                     cfg.window, cfg.block, model.embed)
    tr = head(block_hidden(d.model, b))[0]
    for j, n in enumerate(ns):
        d.truncate(n - 2)  # keep a partly filled cache: incremental update from row n-2
        inf = d.block_logits(seq[: n + 1], dec.mirror)
        torch.testing.assert_close(inf, tr[j], atol=1e-4, rtol=1e-4)
    llm.session.truncate(0)


def test_static_graph_step_equals_eager_step(tiny):
    """The CUDA-graph drafting step's body (block-row context update, fixed gathered window with
    masked rows, run here eagerly on the CPU) gives the eager step's logits, with the window both
    partly empty and sliding, and leaves the cache rows the eager step reads unchanged."""
    from luce_drafters.dflash.graph import GraphedDraftStep

    llm = tiny["llm"]
    cfg = _cfg(window=6)
    d, dec, seq = _drafted(llm, cfg, seed=7)
    # the step sees only what it is given: the fused forward, the cache, the target's embedding and head
    g = GraphedDraftStep(d.fused, d.k_cache, d.v_cache, llm.plan.model.embed_tokens, d.head)
    for n, new in ((4, 2), (9, 6), (len(seq) - 1, len(seq) - 4)):  # window partly empty / sliding
        d.truncate(0)
        eager = d.block_logits(seq[: n + 1], dec.mirror).clone()
        ref_k = d.k_cache[:, :n].clone()
        d.truncate(new)
        g.feats.zero_()
        g.feats[: n - new].copy_(dec.mirror.read(new, n))
        g.new0.fill_(new)
        g.n.fill_(n)
        g.first.fill_(seq[n])
        got = g.body(cfg.block - 1)
        torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g.body(2), eager[:2], atol=1e-4, rtol=1e-4)  # only the rows offered
        torch.testing.assert_close(d.k_cache[:, :n], ref_k, atol=1e-5, rtol=1e-5)
    assert g.fits(10, 14) and not g.fits(10, 10 + cfg.block + 1) and not g.fits(126, 127)
    llm.session.truncate(0)


def test_binding_to_another_target_is_refused(tiny, tmp_path):
    path = tmp_path / "d.safetensors"
    cfg = _cfg(target_hidden=96)
    save_drafter(path, cfg, DFlashModel(cfg))
    with pytest.raises(ConfigError, match="hidden size 96, but this target has 64"):
        make_drafter("dflash", tiny["llm"].plan, DrafterOptions(draft_model=str(path)))
    with pytest.raises(ConfigError, match="--draft-model"):
        make_drafter("dflash", tiny["llm"].plan)


@pytest.mark.parametrize("bad", [["--block", "1"], ["--steps", "0"], ["--batch", "-2"], ["--variants", "5"],
                                 ["--heldout-frac", "1"], ["--time-budget", "-1"], ["--anchors-per-seq", "0"]])
def test_train_rejects_bad_options(tiny, tmp_path, bad):
    with pytest.raises(ConfigError):
        train_main(["--target", tiny["path"], "--out", str(tmp_path / "x.safetensors"), *bad])


def test_widened_drafter_drafts_the_same_for_the_widened_target(tiny, tmp_path):
    """luce_tools.train_drafter.widen: on a target widened by luce_tools.models.widen, the padded drafter
    proposes what the original proposes on the original (same draft logits, same accepted
    lengths), and the CLI refuses a target of another model."""
    from luce_tools.train_drafter.widen import main as widen_main
    from luce_tools.models.widen import widen_gguf

    wide = tmp_path / "wide.gguf"
    widen_gguf(tiny["path"], wide, hidden=96, ffn=160, n_heads=6, n_kv_heads=3)
    src = fixtures.random_dflash(tiny["llm"].plan.model, tmp_path / "d.safetensors", block=4, seed=2)
    assert widen_main([src, "--target", str(wide), "--out", str(tmp_path / "dw.safetensors")]) == 0
    runs = []
    for target, drafter in ((tiny["path"], src), (wide, tmp_path / "dw.safetensors")):
        llm = fixtures.load(target, ctx=128, kv_k="f32", kv_v="f32")
        dec = stepper_for(llm.plan, llm.session, make_drafter("dflash", llm.plan, DrafterOptions(draft_model=str(drafter))),
                          budget=3)
        out = list(generate(dec, [5, 6, 7, 8, 9, 10, 11, 12], 16, Sampler(SamplingParams())))
        seq = dec._mirror_tokens + [llm.session.tokens[-1]]
        runs.append((out, dec.stats.accepted, dec.drafter.block_logits(seq, dec.mirror).clone()))
    (out_a, acc_a, logits_a), (out_b, acc_b, logits_b) = runs
    assert out_a == out_b and acc_a == acc_b
    torch.testing.assert_close(logits_b, logits_a, atol=2e-5, rtol=1e-5)
    other = fixtures.write_tiny(tmp_path / "other.gguf", n_layers=2)
    assert widen_main([src, "--target", other, "--out", str(tmp_path / "x.safetensors")]) == 2

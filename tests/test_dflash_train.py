"""train-drafter: the batched data generator is the target's greedy decoding, packed training
blocks equal one-at-a-time blocks, the prompt split holds topics out, and a short run learns,
reports and keeps to its time budget."""
from __future__ import annotations

import json

import pytest
import torch

from luce_core.contract.drafting import DrafterOptions
from luce_core.generate import PlainStepper, generate
from luce_core.sampling import Sampler, SamplingParams
from luce_core.speculative.wiring import make_drafter, stepper_for
import drafting_fixtures as fixtures
from luce_core.contract.errors import ConfigError
from luce_drafters.dflash.config import DFlashConfig, default_capture
from luce_drafters.dflash.files import load_drafter
from luce_drafters.dflash.model import DFlashModel
from luce_tools.train_drafter.batched_gen import BatchedGreedy
from luce_tools.train_drafter.train import main as train_main
from luce_tools.train_drafter.prompts import SYSTEMS, builtin_prompts, split, with_variants

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ("Explain the water cycle.", "Hi", "def add(a, b):\n    return a + b\n",
         "List three facts about the moon, please, and keep it short.", "x")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dflash_train")
    path = fixtures.write_tiny(d / "t.gguf", seed=3, n_layers=3)
    # f32 K/V: luce's store then rounds nothing, as the batched generator's f32 K/V
    return dict(dir=d, path=path, llm=fixtures.load(path, ctx=128, kv_k="f32", kv_v="f32"))


def _check_batched_greedy(llm) -> int:
    """Batched greedy ids == the Session's greedy ids per prompt, and the features == one plain
    forward's; returns how many rows ended at a stop token."""
    model, tok = llm.plan.model, llm.tokenizer
    prompts = [tok.encode(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: left padding is exercised
    capture = default_capture(model.cfg.n_layers)
    b = BatchedGreedy(model, kv_dtype=torch.float32).generate(prompts, 40, sorted(tok.eos_ids), capture)
    conts = BatchedGreedy.continuations(b)
    stopped = 0
    for r, (p, c) in enumerate(zip(prompts, conts)):
        llm.session.truncate(0)
        ref = list(generate(PlainStepper(llm.session), p, 40, Sampler(SamplingParams()), tok.eos_ids))
        if c and c[-1] in tok.eos_ids:  # a stop token ends the row and is kept; luce does not yield it
            stopped += 1
            assert c[:-1] == ref
        else:
            assert c == ref and len(c) == 40
        assert int(b.lens[r]) == len(p) + len(c) and int(b.prompt_lens[r]) == len(p)
        assert b.tokens[r, :len(p)].tolist() == p and b.tokens[r, len(p):len(p) + len(c)].tolist() == c
        # features: what one forward over the sequence captures, at every fed position
        seq = p + c
        llm.session.truncate(0)
        full = model.forward(torch.tensor(seq[:-1]), 0, llm.session.kv, capture=capture).features
        torch.testing.assert_close(b.feats[r, :len(seq) - 1], full, atol=1e-5, rtol=1e-5)
        assert not b.feats[r, len(seq) - 1:].any()
    llm.session.truncate(0)
    return stopped


def test_batched_greedy_is_the_targets_greedy_decoding(tiny):
    llm = tiny["llm"]
    assert 0 < _check_batched_greedy(llm) < len(TEXTS)  # both endings are covered
    # a cut (should_stop) ends every row early, still consistent
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    cut = BatchedGreedy(llm.plan.model, kv_dtype=torch.float32).generate(
        prompts, 40, (), default_capture(3), should_stop=lambda: True)
    assert int((cut.lens - cut.prompt_lens).max()) == 8


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # Q/K/V biases; Q/K norms, rotate-half RoPE
def test_batched_greedy_follows_each_architecture(tmp_path, arch):
    path = fixtures.write_tiny(tmp_path / f"{arch}.gguf", seed=4, n_layers=2, arch=arch)
    _check_batched_greedy(fixtures.load(path, ctx=128, kv_k="f32", kv_v="f32"))


def test_batched_greedy_refuses_more_positions_than_the_model_has(tiny):
    with pytest.raises(ConfigError, match="RoPE table"):
        BatchedGreedy(tiny["llm"].plan.model).generate([[1, 2, 3]], 200)


def test_packed_blocks_equal_blocks_one_at_a_time():
    """K blocks packed over one shared context (training) equal K separate one-block calls
    with their own context mask (inference's view): blocks never see each other."""
    cfg = DFlashConfig(target_hidden=32, target_vocab=50, target_layers=2, capture=(1, 2), width=32, n_layers=2,
                       n_heads=2, n_kv_heads=1, head_dim=16, ffn=48, block=4, window=5)
    m = DFlashModel(cfg)
    m.reset_parameters(7)
    g = torch.Generator().manual_seed(0)
    S, L = 2, 12
    feats = torch.randn((S, L, cfg.feature_width), generator=g)
    kv = m.context_kv(m.context(feats), torch.arange(L)[None].expand(S, L))
    anchors = torch.tensor([[2, 7, 11], [5, 6, 9]])
    first = torch.randn((S, 3, cfg.target_hidden), generator=g)
    p = torch.arange(L)
    mask = (p < anchors[:, :, None]) & (p >= anchors[:, :, None] - cfg.window)
    packed = m.denoise_blocks(first, anchors, kv, mask)
    for k in range(3):
        one = m.denoise(first[:, k], anchors[:, k], kv, mask[:, k])
        torch.testing.assert_close(packed[:, k], one, atol=1e-5, rtol=1e-5)
    # and the context mask matters (the comparison above is not vacuous)
    assert not torch.allclose(m.denoise(first[:, 0], anchors[:, 0], kv), packed[:, 0], atol=1e-4)


def test_prompt_split_holds_whole_topics_out():
    prompts = builtin_prompts()
    assert len(prompts) > 7000 and {p.family for p in prompts} == {"chat", "code-chat", "code-raw"}
    train, held = split(prompts, 0.08, seed=0)
    assert len(train) + len(held) == len(prompts) and held
    assert not {p.group for p in train} & {p.group for p in held}
    assert split(prompts, 0.08, seed=0) == (train, held)  # deterministic
    two = with_variants(prompts, 2)
    n_chat = sum(p.chat for p in prompts)
    assert len(two) == len(prompts) + n_chat and {p.system for p in two} == set(SYSTEMS[:2])


def _args(tiny, out, *extra):
    return ["--target", tiny["path"], "--out", str(out), "--block", "4", "--layers", "2", "--n-prompts", "48",
            "--heldout", "2", "--val-seqs", "8", "--gen-tokens", "24", "--gen-batch", "16", "--batch", "32",
            "--anchors-per-seq", "8", "--window", "24", "--eval-tokens", "12", "--device", "cpu", "--lr", "3e-3",
            "--warmup", "5", "--eval-every", "20", "--variants", "1", "--no-progress", *extra]


def test_train_drafter_learns_and_reports(tiny, tmp_path, capsys):
    out = tmp_path / "drafter.safetensors"
    assert train_main(_args(tiny, out, "--steps", "60", "--report", str(tmp_path / "r.json"))) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert report["steps"] == 60 and report["train_sequences"] == 48 and report["heldout_sequences"] == 8
    assert report["final_loss"] < report["first_loss"]
    # held-out (unseen topics) validation loss falls, and beats the untrained drafter's accuracy
    curve = report["val_loss_curve"]
    assert curve[0][0] == 0 and report["val_loss"] < curve[0][1] - 0.2
    assert report["heldout_accuracy_at"][0] > report["heldout_accuracy_at_init"][0]
    assert report["matched_plain_greedy"] == [2, 2] and report["eval_prompts"] == 2
    assert report["batched_gen_matched"] == 2 and report["acceptance_length_chain"] >= 1.0
    cfg, _ = load_drafter(out)
    assert cfg.block == 4 and cfg.capture == default_capture(3) and cfg.target_layers == 3
    # the trained file drives speculative decoding through the plugin, losslessly
    llm = tiny["llm"]
    ids = llm.encode("Explain the water cycle in simple terms.")
    llm.session.truncate(0)
    ref = list(generate(PlainStepper(llm.session), ids, 16, Sampler(SamplingParams())))
    opts = DrafterOptions(draft_model=str(out))
    dec = stepper_for(llm.plan, llm.session, make_drafter("dflash", llm.plan, opts), budget=3, options=opts)
    assert list(generate(dec, ids, 16, Sampler(SamplingParams()))) == ref
    llm.session.truncate(0)


def test_train_drafter_keeps_to_its_time_budget(tiny, tmp_path, capsys):
    out = tmp_path / "drafter.safetensors"
    args = _args(tiny, out, "--steps", "1000000", "--time-budget", "4", "--data-frac", "0.01",
                 "--eval-reserve", "1.5")
    assert train_main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train_sequences"] == 16  # data stopped after the first batch
    assert 0 < report["steps"] < 1000000 and out.exists()  # a million steps would take hours here
    assert report["total_s"] < 4 + 4.0  # slack: the first held-out prompt always runs, on a busy CI box

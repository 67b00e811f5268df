"""Carry a DFlash drafter over to a widened copy of its target (``luce_tools.models.widen``).

A widened target's hidden states are the original's in the first ``h`` dimensions and zero in
the rest, so the drafter needs only its target-facing matrices padded: ``fc`` (per captured
layer), ``in_proj`` and ``mask_emb`` take zero columns/entries for the new input dimensions, and
``out_proj`` writes zero rows into them. The widened target's own final norm (rescaled by the
widening) and LM head then give the original logits, so the drafter drafts exactly what it
drafted for the original model. CLI::

    python -m luce_tools.train_drafter.widen dflash-smollm2.safetensors --target smollm2-wide-1.2b.gguf \\
        --out dflash-smollm2-wide.safetensors
"""
from __future__ import annotations

import argparse
import sys

import attrs
import torch

from luce_core.plugin_api import ConfigError
from luce_drafters.dflash.config import DFlashConfig
from luce_drafters.dflash.files import load_drafter, save_drafter
from luce_drafters.dflash.model import build_model
from luce_tools import harness


def widen_drafter(cfg: DFlashConfig, state: dict[str, torch.Tensor], hidden: int) -> tuple[DFlashConfig, dict]:
    h = cfg.target_hidden
    if hidden < h:
        raise ConfigError(f"a drafter for hidden size {h} cannot be narrowed to {hidden}")
    out = dict(state)
    fc = state["fc.weight"]
    wide_fc = fc.new_zeros(fc.shape[0], len(cfg.capture) * hidden)
    for c in range(len(cfg.capture)):
        wide_fc[:, c * hidden:c * hidden + h] = fc[:, c * h:(c + 1) * h]
    out["fc.weight"] = wide_fc
    ip = state["in_proj.weight"]
    out["in_proj.weight"] = torch.cat([ip, ip.new_zeros(ip.shape[0], hidden - h)], dim=1)
    me = state["mask_emb"]
    out["mask_emb"] = torch.cat([me, me.new_zeros(hidden - h)])
    op = state["out_proj.weight"]
    out["out_proj.weight"] = torch.cat([op, op.new_zeros(hidden - h, op.shape[1])])
    return attrs.evolve(cfg, target_hidden=hidden, target_name=f"{cfg.target_name} widened to {hidden}"), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m luce_tools.train_drafter.widen",
                                 description="Pad a DFlash drafter for a target widened by luce_tools.models.widen.")
    ap.add_argument("drafter", help="the drafter file (.safetensors or .gguf)")
    ap.add_argument("--target", required=True, help="the widened target GGUF")
    ap.add_argument("--out", required=True, help="output drafter file")
    a = ap.parse_args(argv)

    def work() -> None:
        from luce_gguf.arch import model_config
        from luce_gguf.reader import open_gguf

        tcfg = model_config(open_gguf(a.target))
        cfg, state = load_drafter(a.drafter)
        if (tcfg.vocab, tcfg.n_layers) != (cfg.target_vocab, cfg.target_layers):
            raise ConfigError(f"{a.target} has vocabulary {tcfg.vocab} and {tcfg.n_layers} layers; the drafter was "
                              f"trained for {cfg.target_vocab} and {cfg.target_layers}",
                              remedy="pass the widened copy of the drafter's own target")
        cfg, state = widen_drafter(cfg, state, tcfg.hidden)
        save_drafter(a.out, cfg, build_model(cfg, state), dtype="f16" if state["fc.weight"].dtype == torch.float16
                     else "f32")
        harness.wrote(a.out, f"target hidden {cfg.target_hidden}")

    return harness.run(work)


if __name__ == "__main__":
    sys.exit(main())

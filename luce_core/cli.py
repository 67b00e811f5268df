"""The ``luce`` command: generate, doctor and plugins; plugins add the others (bench, specs,
train-drafter, ...) through the ``register_commands`` hook."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

from luce_core.config import (DEFAULT_BUDGET, DEFAULT_KV, FEATURE_DTYPES, KV_DTYPES, WEIGHT_FORMATS, RunConfig,
                              budget_arg)
from luce_core.contract.errors import ConfigError, LuceError
from luce_core.contract.impl import ROLES
from luce_core.plugin_host import host
from luce_core.selection import forced_name


def _role_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("implementation overrides (default: auto; env LUCE_<ROLE> works too)")
    for role in ROLES:
        g.add_argument(f"--{role.replace('_', '-')}", dest=f"role_{role}", metavar="NAME")


def run_flags(p: argparse.ArgumentParser) -> None:
    """Add the flags that load and run a model (``luce generate``'s): a command that loads one
    (``luce bench``) takes them too and turns them into ``luce.load`` options with run_overrides."""
    p.add_argument("--model", "-m", help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto | f32 | f16 | bf16")
    p.add_argument("--ctx", type=int, default=0, help="context length (default: min(trained, 4096))")
    p.add_argument("--kv-k", default=DEFAULT_KV[0], choices=KV_DTYPES, help="K cache dtype (default %(default)s)")
    p.add_argument("--kv-v", default=DEFAULT_KV[1], choices=KV_DTYPES, help="V cache dtype (default %(default)s)")
    p.add_argument("--no-kv-rotation", action="store_true", help="do not Hadamard-rotate quantized K")
    p.add_argument("--feature-dtype", default="f32", choices=FEATURE_DTYPES, help="DFlash feature mirror dtype")
    p.add_argument("--weights", choices=WEIGHT_FORMATS,
                   help="matmul weights: native (as stored, default) or nvfp4 (repacked at load); env LUCE_WEIGHTS")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly (no CUDA-graph replay)")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prompt tokens per prefill forward (default: the attention implementation's choice, "
                        "4096 for cuda, 512 for torch)")
    p.add_argument("--caps", help='force capabilities, e.g. "cc=7.5" (like LUCE_CAPS)')
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _role_flags(p)


def run_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """``luce.load`` keyword options from the arguments of run_flags."""
    kw: dict[str, Any] = dict(device=a.device, dtype=a.dtype, ctx=a.ctx, kv_k=a.kv_k, kv_v=a.kv_v,
                              feature_dtype=a.feature_dtype, progress=not a.no_progress,
                              cuda_graphs=not a.no_cuda_graphs, prefill_chunk=a.prefill_chunk)
    if a.weights:  # otherwise RunConfig's default applies (LUCE_WEIGHTS, else native)
        kw["weights"] = a.weights
    if a.no_kv_rotation:  # otherwise RunConfig's default applies (on, unless LUCE_KV_ROTATION=0)
        kw["kv_rotation"] = False
    roles = {role: getattr(a, f"role_{role}") for role in ROLES if getattr(a, f"role_{role}")}
    if forced_name("chunk_selector", RunConfig(overrides=roles)):  # the flag, else LUCE_CHUNK_SELECTOR
        raise ConfigError("the chunk_selector role is not wired into generation yet; drop --chunk-selector",
                          remedy="run without --chunk-selector and with LUCE_CHUNK_SELECTOR unset")
    return {**kw, **roles}


def cmd_generate(a: argparse.Namespace) -> int:
    from luce_core.api import chat_ids, load
    from luce_core.sampling import SamplingParams
    from luce_core.session import check_prompt_fits

    # every argument is checked before the model loads
    if a.system is not None and not a.chat:
        raise ConfigError("--system is the system message of a chat: it needs --chat",
                          remedy="add --chat, or drop --system")
    if a.n < 0:
        raise ConfigError(f"-n is the number of tokens to generate: it must be 0 or more, got {a.n}",
                          remedy="pass -n 64, say")
    sampling = dict(temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                    repetition_penalty=a.repeat_penalty, seed=a.seed)
    SamplingParams(**sampling)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ConfigError("the prompt is empty", remedy="give the prompt as an argument or on stdin")
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
    prompt_ids: list[list[int]] = []

    def check_prompt(loaded: Any, ctx: int) -> None:
        """Tokenize the prompt as soon as the file is parsed: one too long for the context fails
        before the weights are prepared."""
        ids = chat_ids(loaded.tokenizer, messages) if a.chat else loaded.tokenizer.encode(prompt)
        check_prompt_fits(len(ids), ctx, loaded.config.ctx_train)
        prompt_ids.append(ids)

    llm = load(a.model, caps=a.caps, on_loaded=check_prompt, **run_overrides(a))
    # the draft options go along also when LUCE_DRAFTER (not --drafter) names the drafter
    sampling.update(drafter=a.role_drafter, draft_budget=a.draft_budget, draft_tree=a.draft_tree,
                    draft_model=a.draft_model)
    pieces = llm.generate(prompt_ids[0], a.n, **sampling)
    first = next(pieces, "")  # runs the prefill: a prompt error surfaces before anything is echoed
    if not a.chat and not a.no_echo:
        sys.stdout.write(prompt)
    sys.stdout.write(first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if a.stats:
        s = llm.last_stats
        extra = {"speculative": llm.last_spec_stats.as_dict()} if llm.last_spec_stats else {}
        print(json.dumps({**s.as_dict(), "selected": llm.selected(), **extra}), file=sys.stderr)
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from luce_core.doctor import report

    print(report(a.model, caps=a.caps, overrides=run_overrides(a), as_json=a.json))
    return 0


def cmd_plugins(a: argparse.Namespace) -> int:
    h = host()
    commands = h.register_commands(argparse.ArgumentParser(prog="luce").add_subparsers())  # command -> plugin
    for name in h.plugin_names():
        dist = h.distributions.get(name, "registered in-process")
        print(f"{name}  ({dist})")
        for role in ROLES:
            for impl in h.impls(role):
                if impl.plugin == name:
                    print(f"    {role:<15} {impl.name:<16} priority {impl.priority:<4} {impl.summary}")
        for command in sorted(c for c, owner in commands.items() if owner == name):
            print(f"    {'command':<15} luce {command}")
    for name, err in sorted(h.load_errors.items()):
        print(f"{name}  FAILED TO IMPORT: {err}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="luce", description="Fast local LLM inference on GGUF models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a continuation (or a chat reply) to stdout")
    g.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    g.add_argument("-n", type=int, default=64, help="tokens to generate (default %(default)s)")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--no-echo", action="store_true", help="do not print the prompt before the continuation")
    g.add_argument("--stats", action="store_true", help="print timing and selection as JSON on stderr")
    g.add_argument("--draft-budget", type=budget_arg, default=DEFAULT_BUDGET, metavar="N",
                   help="speculative: drafts per step, or draft-tree nodes with --draft-tree (default %(default)s)")
    g.add_argument("--draft-model", metavar="PATH",
                   help="speculative: the draft GGUF (--drafter draft-model) or drafter file (--drafter dflash)")
    g.add_argument("--draft-tree", action="store_true", help="speculative: verify a draft tree (DDTree), not a chain")
    run_flags(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("doctor", help="probed capabilities and, per role, every candidate with its reasons")
    d.add_argument("--json", action="store_true")
    run_flags(d)
    d.set_defaults(func=cmd_doctor)

    pl = sub.add_parser("plugins", help="installed plugins, their implementations and commands")
    pl.set_defaults(func=cmd_plugins)

    host().register_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except LuceError as e:  # two plugins add one command
        print(f"luce: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if getattr(args, "draft_tree", False) and not (args.role_drafter or os.environ.get("LUCE_DRAFTER")):
        parser.error("--draft-tree verifies a drafter's trees: name one with --drafter NAME (or LUCE_DRAFTER)")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LuceError as e:
        print(f"luce: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nluce: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

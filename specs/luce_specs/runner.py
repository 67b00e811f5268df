"""``luce specs [--plugin NAME] [--max-examples N] [pytest args...]``: run the conformance specs.

    python -m luce_specs.runner --plugin example -q

Runs pytest on the installed ``luce_specs`` package, so it works from any directory and on a
plugin installed from anywhere; skip reasons (implementations that cannot run here, and why)
are listed at the end; arguments it does not know go to pytest unchanged.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from luce_specs import MAX_EXAMPLES_ENV


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" in argv:  # `luce specs --plugin X -- -x -q`: a separator for the CLI, not for pytest
        argv.remove("--")
    parser = argparse.ArgumentParser(
        prog="luce specs", allow_abbrev=False, description="Run luce's conformance specs (one suite per role) on the "
        "installed implementations; other arguments are passed to pytest.")
    parser.add_argument("--plugin", metavar="NAME",
                        help="only implementations from this plugin (its entry-point name in group 'luce')")
    parser.add_argument("--max-examples", type=int, metavar="N",
                        help=f"hypothesis examples per test (default: each suite's own; env {MAX_EXAMPLES_ENV})")
    return parser.parse_known_args(argv)


def pytest_args(argv: list[str]) -> list[str]:
    """The pytest command line for the runner's arguments (-ra first: a later -r wins)."""
    args, rest = _parse(argv)
    out = ["-p", "luce_specs.plugin", "-p", "no:cacheprovider", "-ra", "--pyargs", "luce_specs"]
    if args.plugin:
        out += ["--luce-plugin", args.plugin]
    return out + rest


def _missing() -> list[str]:
    """What the specs run on and is not installed (luce's ``test`` extra brings both)."""
    return [name for name in ("pytest", "hypothesis") if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, _ = _parse(argv)
    missing = _missing()
    if missing:
        print(f"luce specs: the specs run on pytest and hypothesis; not installed: {', '.join(missing)}\n"
              "  remedy: pip install 'luce[test]'", file=sys.stderr)
        return 2
    import pytest

    if args.max_examples is not None:
        if args.max_examples < 1:
            print("luce specs: --max-examples must be at least 1", file=sys.stderr)
            return 2
        os.environ[MAX_EXAMPLES_ENV] = str(args.max_examples)  # read when the suites are imported
    return int(pytest.main(pytest_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

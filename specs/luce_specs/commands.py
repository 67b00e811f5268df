"""``luce specs``: the conformance specs as a ``luce`` subcommand (the register_commands hook).

Every argument after ``specs`` goes to luce_specs.runner, which reads its own options
(``--plugin``, ``--max-examples``, ``--help``) and passes the rest to pytest.
"""
from __future__ import annotations

import argparse

from luce_core.plugin_api import hookimpl


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    # no option prefix: argparse takes every argument, options included, as a plain word for the runner
    p = subparsers.add_parser("specs", help="run the conformance specs (optionally on one plugin's implementations)",
                              add_help=False, prefix_chars="\0")
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=_run)


def _run(a: argparse.Namespace) -> int:
    from luce_specs.runner import main

    return main(a.argv)

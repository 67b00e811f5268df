"""What every luce tool does the same way, as a ``luce`` command or as ``python -m``: errors and
exit codes, the "wrote PATH" line, JSON results, progress bars on stderr.

Light to import (no numpy, no torch): the command tree in ``luce_tools.plugin`` uses it while
``luce`` builds its parser.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from luce_core.plugin_api import LuceError

Run = Callable[[argparse.Namespace], "int | None"]


def run(work: Callable[[], int | None]) -> int:
    """Call a tool's ``work``: its exit status (0 for None); a LuceError or OSError (a user's
    mistake or a file that cannot be read or written) is printed as ``luce: error: ...`` on
    stderr, without a traceback, and exits 2."""
    try:
        return work() or 0
    except (LuceError, OSError) as e:
        print(f"luce: error: {e}", file=sys.stderr)
        return 2


def command(target: str) -> Callable[[argparse.Namespace], int]:
    """A command's ``func`` that imports ``"module:function"`` only when the command runs (so
    building the ``luce`` parser imports no tool) and calls it under :func:`run`."""
    module, _, name = target.partition(":")

    def func(a: argparse.Namespace) -> int:
        return run(lambda: getattr(importlib.import_module(module), name)(a))

    return func


def main(argv: Sequence[str] | None, module: str, add_arguments: Callable[[argparse.ArgumentParser], None],
         tool: Run) -> int:
    """``python -m module``: the same arguments and rules as the tool's ``luce`` command."""
    p = argparse.ArgumentParser(prog=f"python -m {module}")
    add_arguments(p)
    a = p.parse_args(argv)
    return run(lambda: tool(a))


def wrote(path: str | os.PathLike[str], detail: str = "") -> None:
    """The line a tool ends with once it has written a file."""
    print(f"wrote {os.fspath(path)}" + (f" ({detail})" if detail else ""), file=sys.stderr)


def emit_json(result: dict[str, Any], out: str | os.PathLike[str] | None) -> None:
    """A tool's JSON result: on stdout, and into ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        wrote(out)


def progress(total: int, desc: str, enabled: bool = True, unit: str = "it", **kw: Any) -> Any:
    """A tqdm progress bar on stderr (stdout stays for results); a no-op one unless ``enabled``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, **kw)

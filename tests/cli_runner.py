"""Run the ``luce`` command in a subprocess the way a user would, for the CLI tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

TIMEOUT_S = 300


@attrs.frozen
class CliRun:
    args: list[str]
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"luce {' '.join(self.args)} -> rc {self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without luce overrides (LUCE_CACHE, which locates the model, stays)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUCE_") or k == "LUCE_CACHE"}
    env.update(extra)
    return env


def console_script() -> str:
    """The installed ``luce`` command of this interpreter's environment."""
    beside = Path(sys.executable).with_name("luce")
    found = str(beside) if beside.exists() else shutil.which("luce")
    assert found, "the `luce` console script is not installed"
    return found


def run_luce(args: list[str], *, stdin: str | None = None, script: bool = False, **env: str) -> CliRun:
    """``luce ARGS`` (``python -m luce_core.cli``, or the console script), one OpenMP thread: several
    runs share the cores with the in-process tests, and oversubscribed pools spin instead of working."""
    cmd = [console_script()] if script else [sys.executable, "-m", "luce_core.cli"]
    p = subprocess.run([*cmd, *args], capture_output=True, text=True, input=stdin,
                       stdin=None if stdin is not None else subprocess.DEVNULL, timeout=TIMEOUT_S,
                       env=clean_env(OMP_NUM_THREADS="1", **env))
    return CliRun(args, p.returncode, p.stdout, p.stderr)

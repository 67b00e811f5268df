"""The layering rule, read from every import statement (``ast``, lazy ones inside functions too):

* ``luce_core`` imports no plugin or backend package, nor the public facade ``luce`` that is
  built on top of it (only the facade itself, ``luce_core/luce/``, imports the core);
* a plugin, backend, tool or spec package (and a third-party-style test plugin) imports of the
  core only ``luce_core.plugin_api`` (the plugin surface) and ``luce_core.formats`` (the pure
  codecs); tools may also use the facade ``luce``, as any user does.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
PLUGIN_PACKAGES = ("luce_torch", "luce_cuda", "luce_gguf", "luce_drafters", "luce_chunks", "luce_tools", "luce_specs")
# folders of the packages on the plugin side; a folder of tests/ with a pyproject.toml is a
# third-party-style test plugin (tests/example_plugin)
OUTSIDE_CORE = ("backends", "plugins", "specs",
                *sorted(p.parent.relative_to(REPO).as_posix() for p in REPO.glob("tests/*/pyproject.toml")))
TOOLS = ("plugins/luce_tools",)  # may import the facade `luce`
SURFACE = ("luce_core.plugin_api", "luce_core.formats")

# Deliberate exceptions, if one is ever needed: a violation not listed here fails, and so does
# an entry that is no longer a violation.
ALLOWED: set[tuple[str, str]] = set()  # (file, module) exceptions, each with a comment saying why


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every absolute import in ``path``; ``from luce_core import x`` counts as
    ``luce_core.x``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "luce_core":
                for alias in node.names:
                    yield node.lineno, f"luce_core.{alias.name}"
            else:
                yield node.lineno, node.module


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _files(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "build" not in p.relative_to(REPO).parts)


def _core_violation(rel: str, module: str) -> bool:
    if rel.startswith("luce_core/luce/"):  # the facade is built on the core
        return False
    return module.split(".")[0] in (*PLUGIN_PACKAGES, "luce")


def _plugin_violation(rel: str, module: str) -> bool:
    top = module.split(".")[0]
    if top == "luce":
        return not rel.startswith(TOOLS)
    if top != "luce_core":
        return False
    return not any(module == s or module.startswith(s + ".") for s in SURFACE)


def violations() -> list[tuple[str, int, str]]:
    found = []
    for path in _files("luce_core"):
        found += [(_rel(path), line, m) for line, m in _imports(path) if _core_violation(_rel(path), m)]
    for folder in OUTSIDE_CORE:
        for path in _files(folder):
            found += [(_rel(path), line, m) for line, m in _imports(path) if _plugin_violation(_rel(path), m)]
    return found


def test_layering() -> None:
    new = [f"{rel}:{line}: imports {m}" for rel, line, m in violations() if (rel, m) not in ALLOWED]
    assert not new, ("imports across the layers (luce_core imports no plugin; plugins import only "
                     "luce_core.plugin_api and luce_core.formats):\n" + "\n".join(new))


def test_allowed_exceptions_are_still_needed() -> None:
    left = {(rel, m) for rel, _, m in violations()}
    stale = sorted(ALLOWED - left)
    assert not stale, f"no longer violations, remove them from ALLOWED: {stale}"


def test_the_rule_catches_what_it_should() -> None:
    """The checks themselves, on made-up imports (a scan that finds nothing proves nothing)."""
    assert _core_violation("luce_core/engine.py", "luce_torch.kv")
    assert _core_violation("luce_core/cli.py", "luce")
    assert not _core_violation("luce_core/luce/__init__.py", "luce_core.api")
    assert not _core_violation("luce_core/api.py", "luce_core.engine")
    assert _plugin_violation("plugins/luce_gguf/loader.py", "luce_core.engine")
    assert _plugin_violation("backends/luce_cuda/kv.py", "luce_core.contract.roles")
    assert _plugin_violation("plugins/luce_drafters/dflash.py", "luce")
    assert not _plugin_violation("plugins/luce_tools/bench/run.py", "luce")
    assert not _plugin_violation("backends/luce_torch/kv.py", "luce_core.formats.blocks")
    assert not _plugin_violation("specs/luce_specs/plugin.py", "luce_core.plugin_api")
    assert not _plugin_violation("plugins/luce_gguf/loader.py", "luce_gguf.reader")

"""The wheel holds every package: ``pip install .`` (the README's first command) builds from the
explicit package list in pyproject.toml, which an editable install does not need, so a new
subpackage missing from it would pass every other test and fail only for users."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_in_the_wheel() -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed, roots = set(tool["packages"]), tool["package-dir"]
    mapped = {REPO / folder for folder in roots.values()}
    found = set()
    for name, folder in roots.items():
        base = REPO / folder
        for init in base.rglob("__init__.py"):
            # a folder mapped to a top-level name of its own (luce_core/luce -> luce) is not a subpackage
            if any(p in mapped for p in init.parents if p != base and base in p.parents):
                continue
            found.add(".".join((name, *init.parent.relative_to(base).parts)))
    assert found <= listed, f"packages missing from pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed <= found, f"listed but not found: {sorted(listed - found)}"

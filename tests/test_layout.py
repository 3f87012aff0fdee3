"""The README's Layout section is the tree, and imports go only the documented way."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "transforms", "flows")
# flows' parts, lowest first: a module may import parts of a lower or equal rank only.
RANK = {
    "job": 0, "form": 0, "children": 0, "tables": 1, "cache": 2, "llm": 2, "report": 2, "plan": 3, "run": 4, "batch": 4,
    "pipeline": 5, "frames": 6, "deployment": 6, "cli": 7,
}  # fmt: skip
LAYER = {"schemas": 0, "transforms": 1, "flows": 2}


def _layout_paths() -> set[str]:
    """Every path the README's Layout block names, rebuilt from its indentation."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Layout\n\n```\n", 1)[1].split("```", 1)[0]
    paths: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(part for _, part in stack) + name
        paths.add(path)
        if name.endswith("/"):
            stack.append((indent, name))
    return paths


def _tree_paths() -> set[str]:
    """Every module and subpackage of the three packages (package markers aside)."""
    found: set[str] = set()
    for package in PACKAGES:
        found.add(f"{package}/")
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO)
            if path.name in ("__init__.py", "__main__.py"):
                if rel.parent.name != package:
                    found.add(f"{rel.parent}/")
                continue
            found.add(str(rel))
    return found


def test_readme_layout_names_every_module_and_nothing_else() -> None:
    """A module added, moved or removed without the README fails here."""
    documented = {p for p in _layout_paths() if p.split("/")[0] in PACKAGES}
    tree = _tree_paths()
    assert tree - documented == set(), "in the tree, missing from the README's Layout"
    assert documented - tree == set(), "in the README's Layout, missing from the tree"


@pytest.mark.parametrize("folder", sorted({p.parent for p in (REPO / "flows").rglob("__init__.py")}))
def test_every_subpackage_says_what_it_owns(folder: Path) -> None:
    """Each subpackage's docstring names what it may import (or that nothing imports it)."""
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
    assert doc, f"{folder} has no docstring"
    assert "import" in doc, f"{folder}'s docstring does not say what it may import"


def _imports(path: Path) -> list[str]:
    """Every llm_enrich module a file imports, at any depth (lazy imports count too)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n.startswith("llm_enrich.")]


def test_imports_go_one_way() -> None:
    """schemas <- transforms <- flows, and inside flows, lower stages never import higher ones."""
    wrong: list[str] = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO)
            mine = rel.with_suffix("").parts
            for name in _imports(path):
                parts = name.split(".")[1:]
                if LAYER.get(parts[0], -1) > LAYER[package]:
                    wrong.append(f"{rel} imports {name}")
                elif package == "flows" == parts[0] and len(parts) > 1 and len(mine) > 1:
                    if RANK.get(parts[1], 99) > RANK.get(re.sub(r"\.py$", "", mine[1]), 99):
                        wrong.append(f"{rel} imports {name}")
    assert wrong == []

"""homegen's packages import one way: configs -> data -> model -> training -> serving -> evaluation. A
package may import itself and the packages before it, never one after it (no cycles)."""

from __future__ import annotations

import ast
import os

from conftest import ROOT

LAYERS = ("configs", "data", "model", "training", "serving", "evaluation")


def imported_packages(path: str) -> set[str]:
    """homegen packages a module imports (`homegen.X...` -> X), at any depth of the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n.split(".")[1] for n in names if n.startswith("homegen.") and n.count(".") >= 1}


def layer_violations(root: str) -> list[str]:
    """'pkg/module.py imports homegen.X' for every import of a package X that comes after pkg."""
    found = []
    for package in LAYERS:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                for target in sorted(imported_packages(path)):
                    if target not in LAYERS[:LAYERS.index(package) + 1]:
                        found.append(f"{os.path.relpath(path, root)} imports homegen.{target}")
    return found


def test_packages_import_one_way():
    assert layer_violations(ROOT) == []


def test_a_new_upward_import_is_caught(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bad.py").write_text("def f():\n    from homegen.serving.engine import PageEngine\n")
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "ok.py").write_text("from homegen.model.transformer import Transformer\n")
    assert layer_violations(str(tmp_path)) == ["model/bad.py imports homegen.serving"]

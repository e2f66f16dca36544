"""Installing homegen adds one top-level package, `homegen`, and nothing with a generic name (data, model,
training, serving, configs); the README's Python example runs from outside the checkout on the installed
copy. (Installed with `pip install --no-deps --target`: the dependencies come from the test environment.)"""

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

GENERIC = ("data", "model", "training", "serving", "configs", "evaluation")


def readme_python_example() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """homegen installed into a folder of its own, built from a copy of the sources (a build leaves a
    build/ folder beside pyproject.toml, which must not land in the checkout)."""
    source, target = tmp_path_factory.mktemp("source"), str(tmp_path_factory.mktemp("site"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), source)
    for package in ("homegen",) + GENERIC:
        shutil.copytree(os.path.join(ROOT, package), source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
                             str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def test_only_homegen_is_installed(installed):
    top = sorted(name for name in os.listdir(installed) if not name.endswith((".dist-info", "__pycache__")))
    assert top == ["homegen"]
    packages = sorted(os.listdir(os.path.join(installed, "homegen")))
    assert set(GENERIC) <= set(packages) and "simulator" in os.listdir(os.path.join(installed, "homegen", "data"))


def test_readme_example_runs_from_another_directory(installed, tiny_checkpoint, tmp_path):
    script = tmp_path / "example.py"
    example = readme_python_example().replace('"runs/demo"', repr(tiny_checkpoint))
    script.write_text(example + "\nimport homegen.serving.engine as e\nprint('FROM', e.__file__)\n")
    env = {**os.environ, "PYTHONPATH": installed}
    result = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"FROM {installed}" in result.stdout
    assert "log p" in result.stdout and "predicted streams" in result.stdout
    for name in GENERIC:
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=str(tmp_path), env=env,
                               capture_output=True, text=True)
        assert probe.returncode == 1 and f"No module named '{name}'" in probe.stderr

"""Installing homegen adds one top-level package, `homegen`, and nothing with a generic name (data, model,
training, serving, configs), and one command, `homegen`; the README's Python example and the command run
from outside the checkout on the installed copy. The declared dependencies are what the code imports, pinned
in constraints.txt. (Installed with `pip install --no-deps --target`: the dependencies come from the test environment.)"""

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


def test_only_homegen_is_installed_and_every_subpackage_with_it(installed):
    top = sorted(name for name in os.listdir(installed) if not name.endswith((".dist-info", "__pycache__")))
    assert top == ["bin", "homegen"] and os.listdir(os.path.join(installed, "bin")) == ["homegen"]  # + the command
    # pyproject.toml lists the packages by hand (the folders map onto homegen.*): every source folder with
    # an __init__.py must be in the installed copy, or it would import in a checkout and not once installed.
    for package in GENERIC:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            if "__init__.py" in files:
                inside = os.path.relpath(folder, ROOT).replace(package, f"homegen/{package}", 1)
                assert os.path.exists(os.path.join(installed, inside, "__init__.py")), f"{inside} is not installed"


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


# Declared but never imported by homegen's code, with the reason each is needed.
RUNTIME_ONLY = {
    "array-record": "TFDS writes and grain reads the array_record files through it (TFDS declares it for Linux only)",
    "importlib-resources": "TFDS's dataset builder imports it lazily, but declares it only for Python < 3.9",
}
CORE = ("homegen", "configs", "data", "model", "training", "serving", "evaluation", "train.py", "serve.py")


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(spec: str) -> str:
    return _normalised(re.match(r"[A-Za-z0-9_.\-]+", spec).group(0))


def _imported_distributions(paths: list[str]) -> dict[str, bool]:
    """Third-party distributions the files import: {name: imported at module level somewhere}."""
    import ast
    import importlib.metadata

    by_module = importlib.metadata.packages_distributions()
    found: dict[str, bool] = {}

    def visit(node, top_level: bool, folder: str):
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module]
            for name in names:
                module = name.split(".")[0]
                # The repository's own modules: a test importing another, train.py, a script.
                local = any(os.path.exists(os.path.join(d, module + ".py")) for d in (folder, ROOT, f"{ROOT}/scripts")) \
                    or os.path.isdir(os.path.join(ROOT, module))
                if module in sys.stdlib_module_names or module == "homegen" or local:
                    continue
                # A module of an extra this environment lacks (e.g. torch) is taken as its distribution's name.
                for dist in by_module.get(module, [module]):
                    found[_normalised(dist)] = found.get(_normalised(dist), False) or top_level
            visit(child, top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)), folder)

    for path in paths:
        with open(path) as f:
            visit(ast.parse(f.read()), True, os.path.dirname(path))
    return found


def _python_files(*roots: str) -> list[str]:
    out = []
    for root in roots:
        path = os.path.join(ROOT, root)
        if path.endswith(".py"):
            out.append(path)
        for folder, _, files in os.walk(path):
            out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return out


def test_declared_dependencies_are_what_the_code_imports():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    core = {_requirement(r) for r in project["dependencies"]}
    extras = {name: {_requirement(r) for r in specs} for name, specs in project["optional-dependencies"].items()}
    used_by_core = _imported_distributions(_python_files(*CORE))
    for dist, top_level in used_by_core.items():
        if top_level:
            assert dist in core, f"homegen imports {dist} when a module loads: declare it in dependencies"
        else:
            assert dist in core or any(dist in e for e in extras.values()), f"{dist} is imported but not declared"
    for dist in _imported_distributions(_python_files("scripts")):
        assert dist in core or any(dist in e for e in extras.values()), f"scripts import {dist}: declare it"
    for dist in _imported_distributions(_python_files("tests")):
        assert dist in core | extras["test"], f"the tests import {dist}: declare it in the test extra"
    unused = core - set(used_by_core) - set(RUNTIME_ONLY)
    assert not unused, f"declared but never imported (and not in RUNTIME_ONLY with a reason): {sorted(unused)}"
    assert "matplotlib" not in core, "plots are the `plots` extra: training and serving do not need matplotlib"


def test_constraints_pin_the_versions_the_suite_runs_with():
    """constraints.txt (scripts/lock.sh writes it; scripts/setup.sh and CI install with it) pins every
    declared dependency exactly, and this environment has those versions."""
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            if "==" in line and not line.lstrip().startswith("#"):
                name, version = line.split("==", 1)
                pins[_normalised(name.strip())] = version.split(";")[0].strip()
    declared = {_requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    for dist in declared:
        assert dist in pins, f"constraints.txt does not pin {dist}: run scripts/lock.sh"
        assert importlib.metadata.version(dist) == pins[dist], (
            f"{dist} {importlib.metadata.version(dist)} is installed but constraints.txt pins {pins[dist]}")
    with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
        assert "-c constraints.txt" in f.read()


def test_the_installed_command_runs_from_another_directory(installed, tiny_checkpoint, tmp_path):
    """`homegen simulate|serve|train` from the installed copy's console script, outside the checkout."""
    command = os.path.join(installed, "bin", "homegen")
    env = {**os.environ, "PYTHONPATH": installed}
    run = lambda *args: subprocess.run([command, *args], cwd=str(tmp_path), env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=600)
    simulated = run("simulate", "--out", "world", "--items", "400", "--pages", "200", "--requests", "5",
                    "--eval-requests", "0")
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "world"))[:2] == ["catalog.jsonl", "heldout_pages.jsonl"]
    served = run("serve", "--checkpoint", tiny_checkpoint, "--user", "u1", "--beam_size", "1")
    assert served.returncode == 0, served.stderr[-3000:]
    assert "log p" in served.stdout
    # A config by name is the installed configs/<name>.py: here it gets as far as the bad override.
    trained = run("train", "--config", "pages_small:semantic", "--workdir", "run", "--config.train.steps=x")
    assert trained.returncode != 0 and "flag --config.train.steps=x" in trained.stderr
    assert run("nonsense").returncode == 2 and run("--help").stdout.startswith("`homegen COMMAND ARGS`")


def test_config_names_resolve_to_the_packages_config_files(tmp_path):
    from homegen.commands.train import config_file

    demo = config_file("demo")
    assert demo.endswith(os.path.join("configs", "demo.py")) and os.path.exists(demo)
    assert config_file("pages_small:semantic") == config_file("pages_small") + ":semantic"
    own = tmp_path / "mine.py"
    own.write_text("")
    assert config_file(str(own)) == str(own) and config_file("no_such_config") == "no_such_config"

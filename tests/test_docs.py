"""The commands the README and docs/ show still exist with the flags they show: every `python SCRIPT ...` and
`homegen COMMAND ...` line of their shell blocks names a program whose --help lists each flag used (config
overrides `--config.x.y=...` aside: train.py checks those against the config when it runs)."""

import glob
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT

PROGRAM = re.compile(r"(?:python3?|\.venv/bin/python)\s+((?:scripts/)?[\w/]+\.py)(?: ([a-z][a-z_]*)\b(?! *=))?"
                     r"|\bhomegen (train|serve|evaluate|simulate|join)\b")
FLAG = re.compile(r"(?<![\w-])--([a-zA-Z][\w-]*)")


def documented_commands() -> dict[str, set[str]]:
    """program (a script path with its subcommand where it has one, or `homegen NAME`) -> the flags the docs pass
    it."""
    commands: dict[str, set[str]] = {}
    for path in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        with open(path) as f:
            text = f.read()
        for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").split("\n"):
                line = line.split(" # ")[0]
                for match in PROGRAM.finditer(line):
                    program = " ".join(filter(None, match.group(1, 2))) if match.group(1) else f"homegen {match.group(3)}"
                    rest = line[match.end():]
                    following = PROGRAM.search(rest)  # a second program on the line (after &&, |, ;)
                    own = (rest[:following.start()] if following else rest).split(" -- ")[0]  # after --: passed on
                    flags = FLAG.findall(own)
                    commands.setdefault(program, set()).update(f for f in flags if not f.startswith("config."))
    return commands


def help_text(program: str) -> str:
    argv = ([sys.executable, "-m", "homegen.cli", program.split()[1]] if program.startswith("homegen ")
            else [sys.executable, *program.split()])  # a script, then its subcommand if any
    result = subprocess.run(argv + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    if "--helpfull" in text:  # absl programs list their flags there
        result = subprocess.run(argv + ["--helpfull"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        text += result.stdout + result.stderr
    return text


@pytest.mark.slow
def test_documented_commands_exist_with_their_flags():
    commands = documented_commands()
    assert {"train.py", "serve.py", "scripts/evaluate.py", "homegen join"} <= set(commands)
    for program in commands:
        if not program.startswith("homegen "):
            script = program.split()[0]
            assert os.path.isfile(os.path.join(ROOT, script)), f"the docs run {script}, which does not exist"
    with ThreadPoolExecutor(2) as pool:
        helps = dict(zip(commands, pool.map(help_text, commands)))
    missing = [f"{program} --{flag}" for program, flags in commands.items() for flag in sorted(flags)
               if f"--{flag}" not in helps[program] and not (flag.startswith("no") and f"--{flag[2:]}" in helps[program])]
    assert not missing, f"flags the docs show that the programs do not take: {missing}"

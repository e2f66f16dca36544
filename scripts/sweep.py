"""Runs a grid of train.py configurations one after another and prints one table of their validation figures.

    python scripts/sweep.py --config configs/amazon_toys.py --root runs/sweep_toys \\
        --set train.patience=10 --grid model.dropout=0.2,0.5 --grid loss.kind=full,sampled
    python scripts/sweep.py --root runs/sweep_toys          # the table of every run under ROOT, nothing trained

Each run trains in ROOT/<name> (named by its grid values) with early stopping and model selection on
validation only: the table shows each run's best step by the config's train.best_metric and that step's
validation figures, never a test number. Runs share one TFDS folder (ROOT/tfds). Starting the same command
again resumes a cut run and skips finished ones (train.py resumes from checkpoints), so a sweep survives a
restart. The table is also written to ROOT/sweep.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from homegen.evaluation.sweep import format_table, grid_runs, run_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(config: str, root: str, run) -> int:
    """train.py for one run of the sweep; its output goes to ROOT/<name>.log. Returns the exit code."""
    workdir = os.path.join(root, run.name)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, "--workdir", workdir,
           f"--config.data.data_dir={os.path.join(root, 'tfds')}", *run.flags()]
    with open(workdir + ".log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder holding one folder per run")
    parser.add_argument("--config", default=None, help="train.py config file (without it: only the table)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override every run gets")
    parser.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                        help="values to try; several --grid flags give every combination")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    try:
        runs = grid_runs(args.set, args.grid) if args.config else []
    except ValueError as e:
        parser.error(str(e))
    os.makedirs(root, exist_ok=True)
    for k, run in enumerate(runs, 1):
        print(f"[{k}/{len(runs)}] {run.name}: training (log: {os.path.join(root, run.name)}.log)", flush=True)
        code = train(args.config, root, run)
        if code == 75:  # stopped by a signal: the same command resumes the sweep
            print("sweep.py: stopped by a signal; run the same command to resume", file=sys.stderr)
            return 75
        if code:
            print(f"sweep.py: {run.name} failed with exit code {code}; see its log", file=sys.stderr, flush=True)
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n, "checkpoints")))
    if not names:
        print(f"sweep.py: error: no run under {root}", file=sys.stderr)
        return 2
    table = format_table([run_summary(os.path.join(root, n)) for n in names])
    with open(os.path.join(root, "sweep.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

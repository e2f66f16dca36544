"""Hyperparameter sweeps over train.py: the runs a grid of config overrides names, and one table of every
run's validation figures (read back from its checkpoints, so a table can be rebuilt at any time)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re

from homegen.model.transformer import TransformerConfig
from homegen.training.checkpoints import Checkpoints
from homegen.training.early_stopping import EarlyStopping


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its folder name and the config overrides (`section.key` -> value text)."""

    name: str
    overrides: tuple[tuple[str, str], ...]

    def flags(self) -> list[str]:
        return [f"--config.{key}={value}" for key, value in self.overrides]


def _parse_assignment(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z_]+\.[a-z_0-9]+", key) or not values:
        raise ValueError(f"expected SECTION.KEY=VALUE[,VALUE...] (e.g. model.dropout=0.2,0.5), got {text!r}")
    return key, values.split(",")


def grid_runs(fixed: list[str], grid: list[str]) -> list[SweepRun]:
    """Every combination of the `grid` assignments (`model.dropout=0.2,0.5`), each with the `fixed` ones
    (`train.patience=10`); a run is named by its grid values (`model.dropout=0.2+loss.kind=full`)."""
    fixed_pairs = []
    for text in fixed:
        key, values = _parse_assignment(text)
        if len(values) != 1:
            raise ValueError(f"--set takes one value, got {text!r} (use --grid for several)")
        fixed_pairs.append((key, values[0]))
    axes = [_parse_assignment(text) for text in grid]
    runs = []
    for combo in itertools.product(*[[(key, v) for v in values] for key, values in axes]):
        name = "+".join(f"{key}={value}" for key, value in combo) or "base"
        if not re.fullmatch(r"[A-Za-z0-9_.=+@-]+", name):
            raise ValueError(f"a run name must be a plain file name, got {name!r}: use simpler values")
        runs.append(SweepRun(name, tuple(fixed_pairs) + tuple(combo)))
    return runs


def run_summary(workdir: str) -> dict:
    """What a run folder's checkpoints say: parameters, steps, epochs and minutes trained, whether it stopped
    early, and its best step by the run's own `train.best_metric` with that step's epoch and validation
    figures."""
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    if not checkpoints.steps():
        return {"run": os.path.basename(workdir), "status": "no checkpoint"}
    last, meta = checkpoints.read_meta()
    train = meta["config"]["train"]
    metric, mode = train.get("best_metric", "validation_loss"), train.get("best_mode", "min")
    best = checkpoints.best_step(metric, mode)
    progress = meta.get("progress", {})
    stopper = EarlyStopping.restore(metric, mode, train.get("patience", 0), progress.get("early_stopping"))
    status = "stopped early" if stopper.should_stop else "finished" if last >= train["steps"] else "running or cut"
    row = {"run": os.path.basename(workdir), "status": status,
           "parameters": TransformerConfig(**meta["model"]).num_params(), "last_step": last,
           "epochs": progress.get("epochs"), "minutes": progress.get("seconds", 0.0) / 60,
           "best_step": best, "best_metric": metric, "best_mode": mode}
    if best is not None:
        row["best_epoch"] = checkpoints.read_meta(best)[1].get("progress", {}).get("epochs")
        row.update({k: v for k, v in checkpoints.manager.metrics(best).items() if k.startswith("validation_")})
    return row


def format_table(rows: list[dict], columns=("validation_hr@10", "validation_ndcg@10", "validation_loss")) -> str:
    """A Markdown table of run summaries, the best by each run's `best_metric` first."""
    def cell(value, digits: int) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    def order(row: dict) -> float:
        value = row.get(row.get("best_metric", ""), math.nan)
        return -value if row.get("best_mode") == "max" else value

    head = ["run", "status", "parameters", "epochs", "minutes", "best step", "its epoch", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in sorted(rows, key=lambda r: (math.isnan(order(r)), order(r))):
        values = [(row["run"], 0), (row["status"], 0), (row.get("parameters"), 0), (row.get("epochs"), 1),
                  (row.get("minutes"), 1), (row.get("best_step"), 0), (row.get("best_epoch"), 1),
                  *[(row.get(c), 4) for c in columns]]
        lines.append("| " + " | ".join(cell(v, d) for v, d in values) + " |")
    return "\n".join(lines)

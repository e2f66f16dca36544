"""Model selection on validation: early stopping (the tracker's rules, and a run that stops, keeps its best
step and resumes with its patience counter where the checkpoint left it) and scripts/sweep.py."""

import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, assert_trees_equal, params_of, tiny_config

from homegen.training.checkpoints import Checkpoints
from homegen.training.early_stopping import EarlyStopping
from homegen.training.loop import run


def test_tracker_counts_evaluations_without_improvement():
    tracker = EarlyStopping("validation_ndcg@10", "max", patience=2)
    for step, value in [(10, 0.1), (20, 0.3), (30, 0.2)]:
        tracker.update(step, {"validation_ndcg@10": value})
    assert (tracker.best, tracker.best_step, tracker.evals_since_best, tracker.should_stop) == (0.3, 20, 1, False)
    tracker.update(40, {"validation_ndcg@10": 0.3})  # equal is not better
    assert tracker.should_stop and "has not improved for 2 evaluations" in tracker.reason()
    tracker.update(50, {"validation_ndcg@10": 0.31})
    assert not tracker.should_stop and tracker.best_step == 50


def test_tracker_minimises_ignores_nan_and_never_stops_without_patience():
    tracker = EarlyStopping("validation_loss", "min", patience=1)
    tracker.update(1, {"validation_loss": 2.0})
    tracker.update(2, {"validation_loss": math.nan})
    assert tracker.should_stop and tracker.best == 2.0
    never = EarlyStopping("validation_loss", "min", patience=0)
    for step in range(1, 20):
        never.update(step, {"validation_loss": float(step)})
    assert not never.should_stop and never.evals_since_best == 18


def test_tracker_state_round_trips_and_bad_settings_are_clear():
    tracker = EarlyStopping("validation_loss", "min", patience=3)
    tracker.update(5, {"validation_loss": 1.5})
    tracker.update(10, {"validation_loss": 1.7})
    again = EarlyStopping.restore("validation_loss", "min", 3, tracker.state())
    assert again.state() == tracker.state()
    assert EarlyStopping.restore("validation_ndcg@10", "max", 3, tracker.state()).best is None  # another metric
    with pytest.raises(ValueError, match="does not report"):
        tracker.update(15, {"validation_hr@10": 0.1})
    with pytest.raises(ValueError, match="best_mode"):
        EarlyStopping("validation_loss", "lowest", 1)


def _expected_stop(curve: dict[int, float], patience: int) -> tuple[int, int, int]:
    """(stop step, best step, the first step after the best with one evaluation without improvement) that
    the rules give for an evaluated curve."""
    tracker, first_miss = EarlyStopping("validation_loss", "min", patience), None
    for step in sorted(curve):
        tracker.update(step, {"validation_loss": curve[step]})
        if tracker.evals_since_best == 1 and first_miss is None:
            first_miss = step
        if tracker.should_stop:
            return step, tracker.best_step, first_miss
    raise AssertionError(f"the curve never stops: {curve}")


def test_run_stops_early_keeps_its_best_step_and_resumes_with_its_counter(data_dir, tmp_path):
    """A high constant learning rate makes validation loss worsen: the run stops where the rules say, the
    best step is a kept checkpoint, and a run cut after one evaluation without improvement and resumed
    stops at the same step with the same parameters; running the finished command again does nothing."""
    from homegen.evaluation.plots import read_scalars

    cfg = tiny_config(data_dir, steps=400, eval_every=2, checkpoint_every=1000, keep_last=1, keep_best=1, patience=2,
                      learning_rate=0.3, warmup_steps=1, final_lr_fraction=1.0)
    whole = run(cfg, str(tmp_path / "whole"))
    curve = dict(read_scalars(str(tmp_path / "whole" / "tensorboard"))["validation_loss"])
    stop, best, first_miss = _expected_stop(curve, patience=2)
    assert whole.step == stop < 400 and max(curve) == stop
    ckpt = Checkpoints(str(tmp_path / "whole" / "checkpoints"), read_only=True)
    assert set(ckpt.steps()) == {best, stop} and ckpt.best_step("validation_loss", "min") == best

    cut = tiny_config(data_dir, steps=first_miss, eval_every=2, checkpoint_every=1000, keep_last=1, keep_best=1,
                      patience=2, learning_rate=0.3, warmup_steps=1, final_lr_fraction=1.0)
    assert run(cut, str(tmp_path / "resumed")).step == first_miss
    resumed = run(cfg, str(tmp_path / "resumed"))
    assert resumed.step == stop  # a counter started afresh would have waited for 2 more evaluations
    assert_trees_equal(params_of(str(tmp_path / "whole")), params_of(str(tmp_path / "resumed")))
    again = run(cfg, str(tmp_path / "resumed"))
    assert again.step == stop and again.losses == []


def test_sweep_trains_a_grid_and_tables_validation_figures(walks_file, tmp_path):
    """Two runs of a grid train with early stopping on validation NDCG@10, the table ranks them by it (no
    test figure in it), and the same command again trains nothing."""
    from homegen.evaluation.sweep import run_summary

    root = tmp_path / "sweep"
    small = ["model.d_model=32", "model.num_layers=1", "model.num_heads=1", "model.num_kv_heads=1",
             "model.head_dim=32", "model.mlp_dim=64", "data.seq_len=40", "train.batch_size=16", "train.steps=80",
             "train.eval_every=20", "train.checkpoint_every=40", "train.warmup_steps=5", "train.patience=2",
             "train.eval_batches=1", "eval.max_users=0", f"data.interactions={walks_file}", "data.item_attributes=False"]
    cmd = [sys.executable, "scripts/sweep.py", "--config", "configs/amazon_toys.py", "--root", str(root),
           *[a for s in small for a in ("--set", s)], "--grid", "train.learning_rate=0.01,0.0001"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    names = ["train.learning_rate=0.01", "train.learning_rate=0.0001"]
    rows = {name: run_summary(str(root / name)) for name in names}
    fast, slow = rows[names[0]], rows[names[1]]
    assert fast["validation_ndcg@10"] > slow["validation_ndcg@10"] and fast["validation_hr@10"] > 0.5
    for row in rows.values():
        assert row["status"] in ("finished", "stopped early") and row["best_metric"] == "validation_ndcg@10"
        assert row["parameters"] > 0 and row["epochs"] > 1 and row["best_step"] % 20 == 0
    table = (root / "sweep.md").read_text()
    assert table.index(names[0]) < table.index(names[1]) and "test" not in table and table.strip() in first.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and (root / "sweep.md").read_text() == table
    assert {name: run_summary(str(root / name))["last_step"] for name in names} == \
        {name: row["last_step"] for name, row in rows.items()}


def test_sweep_rejects_a_malformed_grid(tmp_path):
    result = subprocess.run([sys.executable, "scripts/sweep.py", "--config", "configs/amazon_toys.py", "--root",
                             str(tmp_path), "--grid", "dropout=0.1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "SECTION.KEY=VALUE" in result.stderr
    assert not os.listdir(tmp_path)

"""Checkpoints a user can trust: a damaged step (bytes flipped, a file truncated or deleted) is detected by
its checksum manifest, named with the damaged file, and skipped for the newest readable step, by serving
and by training (which resumes exactly and sets the damaged step aside); a named step resumes too."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, assert_trees_equal, overrides, params_of, tiny_config

from homegen.training.checkpoints import CheckpointError, Checkpoints
from homegen.training.checksums import MANIFEST
from homegen.training.loop import run


@pytest.fixture(scope="module")
def straight_run(tfds_dir, tmp_path_factory) -> str:
    """A run of 8 steps, checkpointed at steps 4 and 8."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    run(tiny_config(tfds_dir, steps=8, checkpoint_every=4, eval_every=100), workdir)
    return workdir


def copy_of(run_dir: str, tmp_path) -> str:
    target = str(tmp_path / "run")
    shutil.copytree(run_dir, target)
    return target


def largest_param_file(workdir: str, step: int) -> str:
    folder = os.path.join(workdir, "checkpoints", str(step), "params")
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    return max(files, key=os.path.getsize)


def flip_bytes(path: str, count: int = 2000) -> None:
    """Inverts `count` bytes in the middle of the file; its size stays the same."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        start = max(0, len(data) // 2 - count // 2)
        for k in range(start, min(len(data), start + count)):
            data[k] ^= 0xFF
        f.seek(0)
        f.write(data)


def test_every_finished_step_has_a_manifest(straight_run):
    ckpt = Checkpoints(os.path.join(straight_run, "checkpoints"), read_only=True)
    assert ckpt.steps() == [4, 8]
    for step in ckpt.steps():
        assert os.path.isfile(os.path.join(ckpt.step_dir(step), MANIFEST))
        ckpt.verify(step)


def test_flipped_bytes_are_detected_and_serving_falls_back(straight_run, tmp_path):
    workdir = copy_of(straight_run, tmp_path)
    damaged = largest_param_file(workdir, 8)
    size = os.path.getsize(damaged)
    flip_bytes(damaged)
    assert os.path.getsize(damaged) == size
    rel = os.path.relpath(damaged, os.path.join(workdir, "checkpoints", "8"))
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    with pytest.raises(CheckpointError, match=f"step 8 .* is damaged: {rel} has changed"):
        ckpt.restore_params(8)
    step, _ = ckpt.restore_params(None)
    assert step == 4 and 8 in ckpt.damaged

    result = subprocess.run([sys.executable, "serve.py", "--checkpoint", workdir, "--user", "u1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "checkpoint step 4" in result.stdout
    assert "step 8" in result.stderr and rel in result.stderr and "trying an earlier step" in result.stderr
    named = subprocess.run([sys.executable, "serve.py", "--checkpoint", workdir, "--step", "8", "--user", "u1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert named.returncode == 2 and rel in named.stderr and "other steps: [4]" in named.stderr


def test_truncated_latest_step_resumes_from_the_one_before(straight_run, tfds_dir, tmp_path):
    """Training on a run whose latest step is truncated resumes from the step before, sets the damaged step
    aside (not deleted) and ends bitwise equal to the uninterrupted run."""
    workdir = copy_of(straight_run, tmp_path)
    damaged = largest_param_file(workdir, 8)
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    cfg = tiny_config(tfds_dir, steps=8, checkpoint_every=4, eval_every=100)
    result = run(cfg, workdir)
    assert result.step == 8
    assert os.path.isdir(os.path.join(workdir, "checkpoints_set_aside", "8"))
    assert_trees_equal(params_of(workdir), params_of(straight_run))
    assert Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True).steps() == [4, 8]


def test_deleted_file_and_resume_step(straight_run, tfds_dir, tmp_path):
    workdir = copy_of(straight_run, tmp_path)
    os.remove(largest_param_file(workdir, 4))
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    with pytest.raises(CheckpointError, match="step 4 .* is damaged: .* is missing; other steps: \\[8\\]"):
        ckpt.read_meta(4)
    # Step 4 is damaged: resuming there is refused with the reason; a healthy step is resumed from exactly.
    cfg = tiny_config(tfds_dir, steps=8, checkpoint_every=4, eval_every=100)
    with pytest.raises(Exception, match="is missing"):
        run(cfg, workdir, resume_step=4)
    healthy = copy_of(straight_run, tmp_path / "healthy")
    result = run(cfg, healthy, resume_step=4)
    assert result.step == 8 and os.path.isdir(os.path.join(healthy, "checkpoints_set_aside", "8"))
    assert_trees_equal(params_of(healthy), params_of(straight_run))


def test_train_cli_resume_step_and_missing_paths(straight_run, tfds_dir, tmp_path):
    workdir = copy_of(straight_run, tmp_path)
    cfg = tiny_config(tfds_dir, steps=8, checkpoint_every=4, eval_every=100)
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", workdir,
                             "--resume_step=6", *overrides(cfg)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: no checkpoint for step 6 in ")
    for script in ("serve.py", "scripts/evaluate.py"):
        missing = subprocess.run([sys.executable, script, "--checkpoint", "/no/such/path"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
        name = os.path.basename(script)
        assert missing.returncode == 2, missing.stderr
        assert missing.stderr.strip().splitlines()[-1] == f"{name}: error: /no/such/path does not exist"

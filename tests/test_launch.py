"""The launch files in scripts/launch/: the sbatch script trains a two-process job under a stand-in `srun`
that starts its tasks on this machine with SLURM's per-task variables, as srun does on a node."""

import os
import stat
import subprocess
import sys

from conftest import ROOT, overrides, tiny_config

from homegen.training.checkpoints import Checkpoints

FAKE_SRUN = """#!/usr/bin/env bash
# srun's job on one node: start SLURM_NTASKS copies of the command with each task's variables.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost "$@" > "$SRUN_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
code=0
for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
exit $code
"""


def test_sbatch_script_trains_one_job_over_its_tasks(data_dir, tmp_path):
    from test_train import slurm_job_id

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    cfg = tiny_config(data_dir, steps=4, log_every=1, eval_every=100, checkpoint_every=4)
    cfg.data.pack = False
    cfg.mesh.devices = 1
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "SRUN_LOGS": str(tmp_path),
           "SLURM_JOB_ID": str(slurm_job_id()), "SLURM_JOB_NAME": "homegen", "SLURM_NTASKS": "2",
           "SLURM_SUBMIT_DIR": ROOT, "CONFIG": "configs/demo.py", "WORKDIR": str(tmp_path / "run")}
    result = subprocess.run(["bash", "scripts/launch/slurm.sbatch", *overrides(cfg)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
    assert result.returncode == 0, (result.stderr, logs)
    assert "process 0 of 2 (slurm)" in logs[0] and "process 1 of 2 (slurm)" in logs[1], logs
    assert "'data': 2" in logs[0] and "2 process(es)" in logs[0]
    assert Checkpoints(str(tmp_path / "run" / "checkpoints"), read_only=True).steps() == [4]

"""Trains homegen: config -> mesh -> sharded model and optimizer -> jitted steps -> orbax checkpoints.

    python train.py --config configs/demo.py --workdir runs/demo [--config.train.steps=500 ...]
    homegen train --config demo --workdir runs/demo   # installed: a config by name (configs/<name>.py[:variant])
    python train.py --config configs/amazon_toys.py --workdir RUN --config.data.interactions=FILE
    python train.py --config configs/pages_small.py --workdir RUN --init_from OTHER_RUN \
        --config.train.freeze=embed,blocks/attn     # fine-tune from another run's parameters

A restart with the same workdir resumes from its newest readable checkpoint (parameters, optimizer, data
position); a damaged step is skipped with a warning. --resume_step N resumes from an earlier step instead; the
steps after it are moved to WORKDIR/checkpoints_set_aside (nothing is deleted).
Multi-host: under SLURM (srun), Open MPI (mpirun), a Kubernetes Indexed Job or a multi-host Cloud TPU slice the
processes find each other on their own (scripts/launch/ has a file for each); elsewhere pass
--coordinator_address/--num_processes/--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), which also win over what a cluster says. Each process reads its own shard of the data.

SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C) saves a checkpoint at the current step and exits
with code 75; the same command resumes from it exactly.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Run folder: checkpoints, vocabulary, TensorBoard logs.")
flags.DEFINE_string("init_from", None, "Start from the parameters of this run (its latest checkpoint).")
flags.DEFINE_integer("resume_step", None, "Resume from this checkpoint step instead of the newest readable one.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_bool("distributed", None, "Always (true) or never (false) join a multi-process job; unset: when flags, "
                  "JAX_* variables or a detected cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) say so.")
config_flags.DEFINE_config_file("config", None, "A configs/<name>.py file.", lock_config=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS are chatty at INFO
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    from homegen.training import cluster

    try:
        plan = cluster.launch_plan(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                   FLAGS.distributed)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        cluster.initialize(plan)
    except (ValueError, RuntimeError) as e:
        print(f"train.py: error: could not join the {plan.where} job: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if plan is not None:
        import jax

        print(f"process {jax.process_index()} of {jax.process_count()} ({plan.where})", flush=True)
    from homegen.training.loop import TrainingError, TrainingStopped, run

    try:
        result = run(FLAGS.config, FLAGS.workdir, init_from=FLAGS.init_from, resume_step=FLAGS.resume_step)
    except TrainingStopped as e:
        print(f"train.py: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except TrainingError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    summary = {"step": result.step, **{k: v for k, v in result.metrics.items() if math.isfinite(v)}}
    print("done: " + json.dumps(summary), flush=True)


def config_file(value: str) -> str:
    """`--config`'s value as a file absl can load: a path as given, or a config's name (`demo`,
    `pages_small:semantic`) as the installed homegen/configs/<name>.py with its variant."""
    path, colon, variant = value.partition(":")
    if os.path.exists(path):
        return value
    from homegen import configs

    named = os.path.join(os.path.dirname(configs.__file__), f"{path}.py")
    return named + colon + variant if path.isidentifier() and os.path.exists(named) else value


def run_command(argv: list[str] | None = None) -> None:
    """Parses the flags (`--config` by path or name, see `config_file`) and trains; exits with the run's code."""
    argv = list(sys.argv if argv is None else argv)
    for k, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            argv[k] = "--config=" + config_file(arg.split("=", 1)[1])
        elif arg == "--config" and k + 1 < len(argv):
            argv[k + 1] = config_file(argv[k + 1])
    app.run(main, argv=argv)


if __name__ == "__main__":
    run_command()

"""Trains homegen: config -> mesh -> sharded model and optimizer -> jitted steps -> orbax checkpoints.

    python train.py --config configs/demo.py --workdir runs/demo [--config.train.steps=500 ...]
    python train.py --config configs/amazon_toys.py --workdir RUN --config.data.interactions=FILE
    python train.py --config configs/pages_small.py --workdir RUN --init_from OTHER_RUN \
        --config.train.freeze=embed,blocks/attn     # fine-tune from another run's parameters

A restart with the same workdir resumes from its newest readable checkpoint (parameters, optimizer, data
position); a damaged step is skipped with a warning. --resume_step N resumes from an earlier step instead; the
steps after it are moved to WORKDIR/checkpoints_set_aside (nothing is deleted).
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); each process reads its own shard of the data.
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
config_flags.DEFINE_config_file("config", None, "A configs/<name>.py file.", lock_config=True)
FLAGS = flags.FLAGS


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize() when flags or the JAX_* environment ask for several processes."""
    import jax

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return
    num = num_processes if num_processes is not None else int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    pid = process_id if process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "0"))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by the CPU backend
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS are chatty at INFO
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from homegen.training.loop import TrainingError, run

    try:
        result = run(FLAGS.config, FLAGS.workdir, init_from=FLAGS.init_from, resume_step=FLAGS.resume_step)
    except TrainingError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    summary = {"step": result.step, **{k: v for k, v in result.metrics.items() if math.isfinite(v)}}
    print("done: " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    app.run(main)

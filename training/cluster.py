"""Which processes make up the job: explicit flags, the JAX_* environment, or the cluster the job runs in.

A job started by a scheduler needs no hand-passed process ids: under SLURM (srun), Open MPI (mpirun), a
Kubernetes Indexed Job or JobSet, or a multi-host Cloud TPU slice, JAX's own cluster detection fills in the
coordinator address, the number of processes and this process's index. Explicit values win over the
environment, which wins over detection.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How to call jax.distributed.initialize: `where` names the source ('flags', 'environment', 'slurm',
    'open mpi', 'kubernetes', 'cloud tpu', 'forced'); None fields are left to JAX's detection."""

    where: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def detected_cluster(env: Mapping[str, str]) -> tuple[str, int | None] | None:
    """(cluster name, its number of processes where the environment says it) for the scheduler this process
    runs under, or None outside a known multi-process cluster."""
    if all(v in env for v in SLURM_VARS):
        return "slurm", _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "open mpi", _int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE")
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return "kubernetes", None
    hosts = env.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return "cloud tpu", len([h for h in hosts.split(",") if h.strip()])
    return None


def launch_plan(coordinator_address: str | None = None, num_processes: int | None = None,
                process_id: int | None = None, force: bool | None = None,
                env: Mapping[str, str] | None = None) -> Launch | None:
    """How this process joins its job, or None when it runs alone.

    `force=True` always initialises (JAX then detects what is not given: use it where no variable tells,
    as on Cloud TPU VMs started with `--worker=all`); `force=False` never does. A cluster whose
    environment says it has one process runs alone."""
    env = os.environ if env is None else env
    if force is False:
        return None
    num_processes = num_processes if num_processes is not None else _int(env.get("JAX_NUM_PROCESSES"),
                                                                         "JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int(env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
    explicit = coordinator_address is not None
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if coordinator_address:
        return Launch("flags" if explicit else "environment", coordinator_address, num_processes, process_id)
    cluster = detected_cluster(env)
    if cluster is not None:
        name, count = cluster
        if (num_processes or count) == 1 and not force:
            return None
        return Launch(name, None, num_processes, process_id)
    if force:
        return Launch("forced", None, num_processes, process_id)
    if num_processes not in (None, 1) or process_id not in (None, 0):
        raise ValueError("--num_processes/--process_id need --coordinator_address (or JAX_COORDINATOR_ADDRESS) "
                         "outside a detected cluster (SLURM, Open MPI, Kubernetes, Cloud TPU)")
    return None


def initialize(plan: Launch | None) -> None:
    """jax.distributed.initialize() for `plan` (nothing for a single process); CPU collectives use gloo."""
    if plan is None:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by the CPU backend
    jax.distributed.initialize(coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
                               process_id=plan.process_id)

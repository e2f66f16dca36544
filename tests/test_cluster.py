"""Which processes make up a job: flags, the JAX_* environment, or the cluster's own variables (no JAX needed)."""

import pytest

from homegen.training.cluster import Launch, launch_plan

SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[003-004]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0"}


def test_alone_without_flags_or_cluster():
    assert launch_plan(env={}) is None
    assert launch_plan(num_processes=1, process_id=0, env={}) is None


def test_explicit_flags_win_over_environment_and_cluster():
    env = {**SLURM, "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert launch_plan("a:9", 2, 0, env=env) == Launch("flags", "a:9", 2, 0)
    assert launch_plan(env=env) == Launch("environment", "h:1", 4, 3)
    assert launch_plan(process_id=1, env=env) == Launch("environment", "h:1", 4, 1)


@pytest.mark.parametrize("env,name", [
    (SLURM, "slurm"),
    ({"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:3", "OMPI_COMM_WORLD_SIZE": "8"}, "open mpi"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}, "kubernetes"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "cloud tpu"),
])
def test_cluster_is_detected_and_jax_fills_in_the_rest(env, name):
    assert launch_plan(env=env) == Launch(name)
    assert launch_plan(num_processes=2, env=env) == Launch(name, None, 2, None)  # a flag still wins


def test_a_one_process_cluster_runs_alone_unless_forced():
    one = {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert launch_plan(env=one) is None
    assert launch_plan(env={"TPU_WORKER_HOSTNAMES": "t0"}) is None
    assert launch_plan(force=True, env=one) == Launch("slurm")
    assert launch_plan(force=True, env={}) == Launch("forced")
    assert launch_plan(force=False, env=SLURM) is None


def test_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="need --coordinator_address"):
        launch_plan(num_processes=2, process_id=1, env={})
    with pytest.raises(ValueError, match="SLURM_NTASKS='two' is not an integer"):
        launch_plan(env={**SLURM, "SLURM_NTASKS": "two"})

"""End-to-end checks of train.py: loss falls, sharding, multi-process, resume after SIGKILL, mesh change,
fine-tuning, bad input and NaN handling."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, assert_trees_equal, free_port, params_of, tiny_config, train_cli
from jax.sharding import PartitionSpec

from homegen.training.checkpoints import Checkpoints
from homegen.training.loop import TrainingError, run


def test_demo_trains_and_loss_falls(data_dir, tmp_path):
    result = run(tiny_config(data_dir, steps=40, log_every=5, eval_every=20), str(tmp_path))
    losses = result.losses
    assert losses[-1] < losses[0] - 0.3, losses
    assert np.isfinite(result.metrics["validation_loss"]) and result.metrics["validation_loss"] < losses[0]
    assert os.listdir(tmp_path / "tensorboard")
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), read_only=True)
    step, meta = ckpt.read_meta()
    assert step == 40 and meta["vocab"]["sentencepiece_model"] and meta["model"]["d_model"] == 32


def test_one_device_and_eight_devices_agree(data_dir, tmp_path):
    assert jax.device_count() == 8
    single = run(tiny_config(data_dir, steps=8, log_every=1), str(tmp_path / "one"),)
    cfg = tiny_config(data_dir, steps=8, log_every=1)
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
    sharded = run(cfg, str(tmp_path / "eight"))
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=2e-5)
    gate = sharded.state["params"]["blocks"]["mlp"]["gate"]
    assert gate.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (2, 16, 32)
    embed = sharded.state["params"]["embed"]
    assert embed.sharding.spec == PartitionSpec("tensor", "fsdp")
    assert len(sharded.state["params"]["blocks"]["attn"]["q"].sharding.device_set) == 8

    # The 8-device checkpoint restores onto a 1-device mesh with identical values.
    cfg_one = tiny_config(data_dir, steps=8)
    cfg_one.mesh.devices = 1
    restored = run(cfg_one, str(tmp_path / "eight"))
    assert restored.state["params"]["embed"].sharding.mesh.size == 1
    assert_trees_equal(jax.tree.map(np.asarray, restored.state["params"]),
                       jax.tree.map(np.asarray, sharded.state["params"]))


def test_sigkill_and_resume_is_bitwise_identical(data_dir, tmp_path):
    cfg = tiny_config(data_dir, steps=24, checkpoint_every=4, eval_every=100)
    cfg.mesh.devices = 2
    straight = train_cli(tmp_path / "straight", cfg)
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out
    victim = train_cli(tmp_path / "killed", cfg)
    checkpoint = tmp_path / "killed" / "checkpoints" / "8"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    steps = Checkpoints(str(tmp_path / "killed" / "checkpoints"), read_only=True).steps()
    assert 8 <= max(steps) < 24, steps  # it really died mid-run
    resumed = train_cli(tmp_path / "killed", cfg)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and f"resumed from step {max(steps)}" in out, out
    assert_trees_equal(params_of(tmp_path / "killed"), params_of(tmp_path / "straight"))


def slurm_job_id() -> int:
    """A SLURM job id whose coordinator port (JAX: 61440 + id % 4096) is free on this machine."""
    for _ in range(100):
        port = free_port()
        if port >= 61440:
            return port - 61440 + 4096 * 7
    with socket.socket() as s:  # the kernel's ephemeral range did not reach that high: try the range itself
        for port in range(61440, 65536):
            try:
                s.bind(("127.0.0.1", port))
                return port - 61440 + 4096 * 7
            except OSError:
                continue
    pytest.skip("no free port in 61440-65535 for a SLURM coordinator")


@pytest.mark.parametrize("launch", ["flags", "slurm"])
def test_two_processes_agree_with_one(data_dir, tmp_path, launch):
    """Two processes started by hand (flags) or by SLURM (its environment variables alone) train one job."""
    cfg = tiny_config(data_dir, steps=6, log_every=1, eval_every=100, checkpoint_every=6)
    cfg.data.pack = False
    cfg.mesh.devices = 1
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    if launch == "flags":
        port = free_port()
        procs = [train_cli(tmp_path / "multi", cfg, [f"--coordinator_address=127.0.0.1:{port}",
                                                     "--num_processes=2", f"--process_id={i}"], env=env)
                 for i in range(2)]
    else:
        slurm = {"SLURM_JOB_ID": str(slurm_job_id()), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2"}
        procs = [train_cli(tmp_path / "multi", cfg, env={**env, **slurm, "SLURM_PROCID": str(i),
                                                         "SLURM_LOCALID": str(i)}) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "2 process(es)" in outputs[0] and "'data': 2" in outputs[0]
    assert f"process 1 of 2 ({launch})" in outputs[1], outputs[1]
    cfg.mesh.devices = 2
    single = run(cfg, str(tmp_path / "single"))
    multi_losses = [float(line.split("loss ")[1].split(" ")[0]) for line in outputs[0].splitlines() if "] step" in line]
    np.testing.assert_allclose(multi_losses, single.losses, rtol=1e-4)
    multi, one = params_of(tmp_path / "multi"), params_of(tmp_path / "single")
    for x, y in zip(jax.tree.leaves(multi), jax.tree.leaves(one)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def signal_mid_run(workdir, cfg, sig: int, after_step: int) -> tuple[int, str]:
    """Starts train.py, sends `sig` once it has logged `after_step`, and returns (exit code, output)."""
    proc = train_cli(workdir, cfg)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"] step {after_step}/" in line:
            proc.send_signal(sig)
            break
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, "".join(lines) + out


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_saves_and_resumes_bitwise_identical(data_dir, tmp_path, workers):
    """SIGTERM (a scheduler's preemption) saves the current step and exits 75; the resumed run ends where an
    uninterrupted one does, also with the batches prepared by grain worker processes (their state is in the
    checkpoint). SIGINT takes the same path: test_a_signal_to_one_process_stops_every_process_at_the_same_step."""
    cfg = tiny_config(data_dir, steps=150, log_every=1, eval_every=1000, checkpoint_every=1000)
    cfg.mesh.devices = 2
    cfg.data.workers = workers
    straight = train_cli(tmp_path / "straight", cfg)
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out
    workdir = tmp_path / "preempted"
    code, out = signal_mid_run(workdir, cfg, signal.SIGTERM, after_step=10)
    steps = Checkpoints(str(workdir / "checkpoints"), read_only=True).steps()
    assert code == 75 and len(steps) == 1 and 10 <= steps[0] < 150, (steps, out)
    assert f"stopped by SIGTERM at step {steps[0]} of 150: saved checkpoint {steps[0]}" in out, out
    assert "Traceback" not in out, out
    resumed = train_cli(workdir, cfg)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and f"resumed from step {steps[0]}" in out, out
    assert_trees_equal(params_of(workdir), params_of(tmp_path / "straight"))


def test_fine_tuning_with_frozen_groups(data_dir, tmp_path):
    base = run(tiny_config(data_dir, steps=4), str(tmp_path / "base"))
    tuned = run(tiny_config(data_dir, steps=4, freeze="embed,blocks/attn"), str(tmp_path / "tuned"),
                init_from=str(tmp_path / "base"))
    before, after = base.state["params"], tuned.state["params"]
    np.testing.assert_array_equal(np.asarray(after["embed"]), np.asarray(before["embed"]))
    np.testing.assert_array_equal(np.asarray(after["blocks"]["attn"]["q"]), np.asarray(before["blocks"]["attn"]["q"]))
    assert not np.array_equal(np.asarray(after["blocks"]["mlp"]["up"]), np.asarray(before["blocks"]["mlp"]["up"]))


def test_rowwise_adagrad_embedding_trains_alike_on_one_and_eight_devices(data_dir, tmp_path):
    """train.embedding_optimizer=rowwise_adagrad: one accumulator per embedding row in the state, the loss falls,
    and a data x fsdp x tensor mesh computes what one device does."""
    single = run(tiny_config(data_dir, steps=30, log_every=1, embedding_optimizer="rowwise_adagrad",
                             embedding_learning_rate=0.02), str(tmp_path / "one"))
    cfg = tiny_config(data_dir, steps=30, log_every=1, embedding_optimizer="rowwise_adagrad",
                      embedding_learning_rate=0.02)
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
    sharded = run(cfg, str(tmp_path / "eight"))
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=2e-5)
    assert single.losses[-1] < single.losses[0] - 0.3, single.losses
    vocab_size = sharded.state["params"]["embed"].shape[0]
    accumulators = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(sharded.state["opt_state"])
                    if "sum_of_squares" in jax.tree_util.keystr(path)]
    assert [a.shape for a in accumulators] == [(vocab_size,)] and float(accumulators[0].max()) > 0


@pytest.mark.parametrize("change,message", [
    (lambda c: c.train.update(dict(batch_size=12)), "multiple of the mesh's batch axes"),
    (lambda c: (c.data.update(dict(source="interactions", interactions="/nonexistent/file.txt")),
                c.model.update(dict(value_head=False))), "/nonexistent/file.txt does not exist"),
    (lambda c: c.data.update(dict(source="page_logs")), "needs --config.data.page_logs"),
    (lambda c: c.data.update(dict(source="parquet")), "data.source must be one of"),
    (lambda c: c.loss.update(dict(kind="hierarchical")), "loss.kind"),
    (lambda c: c.loss.update(dict(kind="sampled", label_smoothing=0.1)), "label_smoothing .* needs loss.kind='full'"),
    (lambda c: c.loss.update(dict(label_smoothing=1.0)), "label_smoothing must be in"),
    (lambda c: c.serve.update(dict(stream_candidates=0)), "serve.stream_candidates must be >= 1"),
    (lambda c: c.data.update(dict(workers=-1)), "data.workers must be >= 0"),
    (lambda c: c.mesh.update(dict(data=3, fsdp=-1)), "cannot fill mesh"),
    (lambda c: c.mesh.update(dict(data=3)), "needs 3 devices, have 8"),
    (lambda c: (c.data.update(dict(interactions="/data/toys.txt")), c.model.update(dict(value_head=True))),
     "interaction data has none"),
    (lambda c: c.data.update(dict(page_logs="a.jsonl", interactions="b.txt")), "both data.page_logs and"),
    (lambda c: c.data.update(dict(source="synthetic", page_logs="a.jsonl")), "'synthetic' contradicts data.page_logs"),
    (lambda c: c.data.update(dict(source="interactions", page_logs="a.jsonl")),
     "needs --config.data.interactions=FILE, not data.page_logs"),
    (lambda c: c.data.update(dict(catalog="catalog.jsonl")), "synthetic world has its own catalog"),
])
def test_bad_configs_give_clear_errors(data_dir, tmp_path, change, message):
    cfg = tiny_config(data_dir)
    change(cfg)
    with pytest.raises(TrainingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(cfg, str(tmp_path))


def test_value_head_without_streams_is_an_error(tiny_world_dir, tmp_path):
    logs = tmp_path / "no_streams.jsonl"
    with open(os.path.join(tiny_world_dir, "pages.jsonl")) as src, open(logs, "w") as out:
        for _, line in zip(range(300), src):
            record = json.loads(line)
            for shelf in record["page"]:
                shelf.pop("streams", None)
            out.write(json.dumps(record) + "\n")
    cfg = tiny_config(str(tmp_path / "tfds"))
    cfg.data.update(dict(source="page_logs", page_logs=str(logs)))
    cfg.model.value_head = True
    with pytest.raises(TrainingError, match="no item with known streams"):
        run(cfg, str(tmp_path / "run"))


def test_cli_reports_missing_dataset_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/amazon_toys.py", "--workdir",
                             str(tmp_path), "--config.data.interactions=/nonexistent/toys.txt"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "train.py: error: data.interactions: /nonexistent/toys.txt does not exist (set --config.data.interactions=FILE)"


def test_nan_stops_with_last_good_checkpoint(data_dir, tmp_path):
    cfg = tiny_config(data_dir, steps=40, learning_rate=1e12, warmup_steps=1, log_every=1, checkpoint_every=2,
                      clip_norm=1e30, eval_every=1000)
    with pytest.raises(TrainingError, match="last good checkpoint is step") as err:
        run(cfg, str(tmp_path))
    assert err.value.exit_code == 3
    good = int(str(err.value).split("last good checkpoint is step ")[1].split(" ")[0])
    _, params = Checkpoints(str(tmp_path / "checkpoints"), read_only=True).restore_params(good)
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params))


def test_keeps_last_and_best_checkpoints(data_dir, tmp_path):
    """keep_last=1, keep_best=1 by validation loss: the best evaluated step survives beside the latest."""
    from homegen.evaluation.plots import read_scalars

    cfg = tiny_config(data_dir, steps=12, eval_every=2, checkpoint_every=2, keep_last=1, keep_best=1,
                      learning_rate=0.3, warmup_steps=1)  # a learning rate this high makes later steps worse
    run(cfg, str(tmp_path))
    curve = dict(read_scalars(str(tmp_path / "tensorboard"))["validation_loss"])
    best = min(curve, key=curve.get)
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), read_only=True)
    assert set(ckpt.steps()) == {best, 12}
    assert ckpt.best_step("validation_loss", "min") == best
    assert ckpt.manager.metrics(best)["validation_loss"] == pytest.approx(curve[best], rel=1e-5)


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(data_dir, tmp_path):
    """Ctrl-C reaches process 1 only: JAX's preemption service has both save the same step and exit 75."""
    cfg = tiny_config(data_dir, steps=150, log_every=1, eval_every=1000, checkpoint_every=1000)
    cfg.data.pack = False
    cfg.mesh.devices = 1
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

    def start():
        port = free_port()
        return [train_cli(tmp_path / "run", cfg, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                                  f"--process_id={i}"], env=env) for i in range(2)]

    procs, lines = start(), []
    for line in procs[0].stdout:
        lines.append(line)
        if "] step 10/" in line:
            procs[1].send_signal(signal.SIGINT)
            break
    outputs = ["".join(lines) + procs[0].communicate(timeout=600)[0], procs[1].communicate(timeout=600)[0]]
    steps = Checkpoints(str(tmp_path / "run" / "checkpoints"), read_only=True).steps()
    assert [p.returncode for p in procs] == [75, 75] and len(steps) == 1 and 10 <= steps[0] < 150, outputs
    assert f"stopped by SIGINT at step {steps[0]} of 150" in outputs[1]
    assert f"stopped by SIGTERM at step {steps[0]} of 150" in outputs[0]  # told by the preemption service
    assert not any("Traceback" in out or "KeyboardInterrupt" in out for out in outputs), outputs
    procs = start()
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and f"resumed from step {steps[0]}" in outputs[0], outputs

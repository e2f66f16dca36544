"""orbax checkpoints of a run: parameters, optimizer state, the grain iterator state, and metadata
(config, model config, vocabulary and sentencepiece model) so that a checkpoint is self-contained.

Keeps the last N and the best N by a validation metric; saves asynchronously. Every finished step gets a
checksum manifest (training/checksums.py), verified before the step is restored; restoring "the latest"
falls back to the newest step that verifies and reads, with a warning naming each damaged one.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from typing import TypeVar

import grain
import jax
import orbax.checkpoint as ocp

from homegen.model import lora
from homegen.training.checksums import has_manifest, manifest_problems, write_manifest

log = logging.getLogger(__name__)
T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint, with the steps that are usable."""


def checkpoint_dir(path: str) -> str:
    """A run folder's checkpoints/ subfolder, or `path` itself when it holds the checkpoints."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) else path


def run_folder(path: str) -> str:
    """The folder a run's other files (tfds/, vocab/, eval/) sit under, for `path` naming either the run
    folder or a folder that holds the checkpoints itself (then `path`)."""
    inner = checkpoint_dir(path)
    return os.path.dirname(inner) if inner != path else path


def _first_line(error: Exception, limit: int = 400) -> str:
    """An exception's first line, shortened at a word boundary."""
    text = (str(error).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {text}"


class Checkpoints:
    """A CheckpointManager over `directory` with items params / opt_state / data / meta."""

    def __init__(self, directory: str, keep_last: int = 3, keep_best: int = 1, async_save: bool = True,
                 read_only: bool = False, best_metric: str = "validation_loss", best_mode: str = "min"):
        if best_mode not in ("min", "max"):
            raise ValueError(f"train.best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} does not exist")
        self.read_only, self.async_save = read_only, async_save
        self.damaged: dict[int, str] = {}  # step -> why it cannot be restored, as found so far
        self._verified: set[int] = set()
        self.best_metric, self.best_mode = best_metric, best_mode
        worst = float("inf") if best_mode == "min" else -float("inf")
        metric_of = lambda m: m.get(best_metric, worst)  # noqa: E731
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep_last),
            ocp.checkpoint_managers.BestN(get_metric_fn=metric_of, n=keep_best, reverse=best_mode == "min",
                                          keep_checkpoints_without_metrics=False),
        ])
        # best_fn is what makes orbax write each step's metrics (which BestN and best_step read).
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=metric_of, best_mode=best_mode,
                                               enable_async_checkpointing=async_save, create=not read_only,
                                               read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self, metric: str, mode: str) -> int | None:
        """The kept step with the best value of `metric` ('min' or 'max'), None if no step has it."""
        scored = [(m[metric], s) for s in self.steps() if (m := self.manager.metrics(s)) and metric in m]
        if not scored:
            return None
        return (min(scored) if mode == "min" else max(scored))[1]

    def selected_step(self, step: int | None = None) -> tuple[int, str]:
        """The step to use and why: `step` if given, else the kept step with the best value of the run's own
        validation metric (`train.best_metric` in its config), else the newest readable one."""
        if step is not None:
            return self.read_meta(step)[0], "--step"
        train_cfg = self.read_meta()[1]["config"]["train"]
        metric = train_cfg.get("best_metric", "validation_loss")
        best = self.best_step(metric, train_cfg.get("best_mode", "min"))
        if best is None:
            return self.read_meta()[0], "newest readable (no validation metric stored)"
        return self.read_meta(best)[0], f"best {metric} on validation"

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: dict, data_iterator, meta: dict, metrics: dict | None = None) -> None:
        self.wait()  # the previous step is finished (orbax waits for it anyway) and gets its manifest
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave({"opt_state": state["opt_state"], "step": state["step"]}),
            data=grain.checkpoint.CheckpointSave(data_iterator), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics, force=True)
        if not self.async_save:
            self._record_manifests()

    def _record_manifests(self) -> None:
        """Writes the checksum manifest of every finished step that lacks one (process 0 only)."""
        if self.read_only or jax.process_index() != 0:
            return
        for step in self.steps():
            if os.path.isdir(self.step_dir(step)) and not has_manifest(self.step_dir(step)):
                write_manifest(self.step_dir(step))

    def verify(self, step: int) -> None:
        """Raises CheckpointError naming the damaged files when `step` differs from its manifest (each step
        is hashed once per process)."""
        if step in self._verified:
            return
        problems = manifest_problems(self.step_dir(step))
        if problems is None:
            log.info("checkpoint step %d in %s has no checksum manifest; restoring it unverified", step,
                     self.directory)
        elif problems:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {'; '.join(problems[:3])}"
                                  + (f" (and {len(problems) - 3} more files)" if len(problems) > 3 else ""))
        self._verified.add(step)

    def check_step(self, step: int | None) -> int:
        """`step`, or the latest step when None; CheckpointError when there is no such step."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; steps there: {steps}")
        return step

    def _usable_besides(self, step: int) -> str:
        others = [s for s in self.steps() if s != step and s not in self.damaged]
        return f"other steps: {others}" if others else "no other step"

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        return CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read ({_first_line(error)})")

    def _restore(self, step: int, **items):
        self.verify(step)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many kinds of errors for damaged files
            raise self._unreadable(step, e) from e

    def first_readable(self, load: Callable[[int], T], step: int | None = None) -> tuple[int, T]:
        """(step, load(step)): at `step`, or when None at the newest step that verifies and loads. Each newer
        step that does not is logged as a warning naming what is wrong and kept in `damaged`."""
        if step is not None:
            self.check_step(step)
            try:
                return step, load(step)
            except CheckpointError as e:
                raise CheckpointError(f"{e}; {self._usable_besides(step)}") from e
        self.check_step(None)
        for candidate in reversed(self.steps()):
            if candidate in self.damaged:
                continue
            try:
                return candidate, load(candidate)
            except CheckpointError as e:
                self.damaged[candidate] = str(e)
                log.warning("%s; trying an earlier step", e)
        raise CheckpointError(f"no readable checkpoint in {self.directory}: "
                              + "; ".join(self.damaged[s] for s in sorted(self.damaged, reverse=True)))

    def set_aside_after(self, step: int, folder: str) -> list[int]:
        """Moves every step after `step` into `folder` (nothing is deleted), so that training can resume at
        `step` and save those step numbers again; returns the steps moved. Process 0 moves; every process
        calls `reload` after a barrier."""
        later = [s for s in self.steps() if s > step]
        if jax.process_index() != 0:
            return later
        for s in later:
            target = os.path.join(folder, str(s))
            suffix = 1
            while os.path.exists(target):
                target, suffix = os.path.join(folder, f"{s}.{suffix}"), suffix + 1
            os.makedirs(folder, exist_ok=True)
            shutil.move(self.step_dir(s), target)
        return later

    def reload(self) -> None:
        """Re-reads the steps on disk (after `set_aside_after`)."""
        self.manager.reload()

    def read_meta(self, step: int | None = None) -> tuple[int, dict]:
        """The metadata at `step` (None: of the newest readable step)."""
        return self.first_readable(lambda s: self._restore(s, meta=ocp.args.JsonRestore())["meta"], step)

    def restore_params(self, step: int | None, abstract_params=None) -> tuple[int, dict]:
        """Parameters at `step` (None: of the newest readable step), onto the shardings of `abstract_params`
        if given, else whole arrays on this process's first device."""

        def load(s: int) -> dict:
            target = abstract_params
            if target is None:
                try:
                    metadata = self.manager.item_metadata(s)["params"]
                except Exception as e:  # as in _restore
                    raise self._unreadable(s, e) from e
                device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
            return self._restore(s, params=ocp.args.StandardRestore(target))["params"]

        return self.first_readable(load, step)

    def restore_model_params(self, step: int | None, abstract_params=None) -> tuple[int, dict]:
        """The parameters a model runs with at `step`: the saved ones, or for a LoRA run (its checkpoints
        hold only the adapters) its base run's parameters with the adapters merged in."""
        step, meta = self.read_meta(step)
        base = meta.get("lora")
        if not base:
            return self.restore_params(step, abstract_params)
        _, adapters = self.restore_params(step)
        try:
            _, params = Checkpoints(base["base"], read_only=True).restore_params(base["base_step"], abstract_params)
        except CheckpointError as e:
            raise CheckpointError(f"{self.directory} step {step} holds LoRA adapters of {base['base']} step "
                                  f"{base['base_step']}, which cannot be read: {e}") from e
        sharding = jax.tree.leaves(params)[0].sharding
        if isinstance(sharding, jax.sharding.NamedSharding):  # the adapters are small: replicate them
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        merge = jax.jit(lora.merge, static_argnums=2)
        return step, merge(params, jax.device_put(adapters, sharding), base["alpha"] / base["rank"])

    def restore(self, step: int | None, abstract_state: dict, data_iterator) -> tuple[int, dict]:
        """The full state at `step` (None: the newest readable step) onto the shardings of `abstract_state`;
        the data iterator is restored in place."""

        def load(s: int) -> dict:
            restored = self._restore(
                s, params=ocp.args.StandardRestore(abstract_state["params"]),
                opt_state=ocp.args.StandardRestore({"opt_state": abstract_state["opt_state"],
                                                    "step": abstract_state["step"]}),
                data=grain.checkpoint.CheckpointRestore(data_iterator))
            return {"params": restored["params"], "opt_state": restored["opt_state"]["opt_state"],
                    "step": restored["opt_state"]["step"]}

        return self.first_readable(load, step)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._record_manifests()

    def close(self) -> None:
        self.wait()
        self.manager.close()

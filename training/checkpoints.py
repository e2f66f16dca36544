"""orbax checkpoints of a run: parameters, optimizer state, the grain iterator state, and metadata
(config, model config, vocabulary and sentencepiece model) so that a checkpoint is self-contained.

Keeps the last N and the best N by a validation metric; saves asynchronously.
"""

from __future__ import annotations

import base64
import os

import grain
import jax
import orbax.checkpoint as ocp

from data.vocab import Vocabulary, item_tokenizer_from_json



class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint, with the steps that are usable."""


def vocabulary_to_json(vocab: Vocabulary) -> dict:
    return {"context_tokens": vocab.context_tokens, "shelves": vocab.shelves, "items": vocab.items.to_json(),
            "max_history": vocab.max_history,
            "sentencepiece_model": base64.b64encode(vocab.sentencepiece_model).decode("ascii")}


def vocabulary_from_json(data: dict) -> Vocabulary:
    return Vocabulary(data["context_tokens"], data["shelves"], item_tokenizer_from_json(data["items"]),
                      base64.b64decode(data["sentencepiece_model"]), data["max_history"])


def checkpoint_dir(path: str) -> str:
    """A run folder's checkpoints/ subfolder, or `path` itself when it holds the checkpoints."""
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) else path


class Checkpoints:
    """A CheckpointManager over `directory` with items params / opt_state / data / meta."""

    def __init__(self, directory: str, keep_last: int = 3, keep_best: int = 1, async_save: bool = True,
                 read_only: bool = False, best_metric: str = "validation_loss", best_mode: str = "min"):
        if best_mode not in ("min", "max"):
            raise ValueError(f"train.best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = os.path.abspath(directory)
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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self, metric: str, mode: str) -> int | None:
        """The kept step with the best value of `metric` ('min' or 'max'), None if no step has it."""
        scored = [(m[metric], s) for s in self.steps() if (m := self.manager.metrics(s)) and metric in m]
        if not scored:
            return None
        return (min(scored) if mode == "min" else max(scored))[1]

    def save(self, step: int, state: dict, data_iterator, meta: dict, metrics: dict | None = None) -> None:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave({"opt_state": state["opt_state"], "step": state["step"]}),
            data=grain.checkpoint.CheckpointSave(data_iterator), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def _check_step(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; usable steps: {steps}")
        return step

    def _restore(self, step: int, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many kinds of errors for damaged files
            others = [s for s in self.steps() if s != step]
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read "
                                  f"({type(e).__name__}: {str(e)[:300]}); other steps: {others or 'none'}") from e

    def read_meta(self, step: int | None = None) -> tuple[int, dict]:
        step = self._check_step(step)
        return step, self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore_params(self, step: int | None, abstract_params=None) -> tuple[int, dict]:
        """Parameters at `step` (latest when None), onto the shardings of `abstract_params` if given."""
        step = self._check_step(step)
        if abstract_params is None:  # whole arrays on this process's first device
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                           self.manager.item_metadata(step)["params"])
        return step, self._restore(step, params=ocp.args.StandardRestore(abstract_params))["params"]

    def restore(self, step: int | None, abstract_state: dict, data_iterator) -> tuple[int, dict]:
        """The full state at `step` (latest when None) onto the shardings of `abstract_state`; the data
        iterator is restored in place."""
        step = self._check_step(step)
        restored = self._restore(
            step, params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore({"opt_state": abstract_state["opt_state"],
                                                "step": abstract_state["step"]}),
            data=grain.checkpoint.CheckpointRestore(data_iterator))
        return step, {"params": restored["params"], "opt_state": restored["opt_state"]["opt_state"],
                      "step": restored["opt_state"]["step"]}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

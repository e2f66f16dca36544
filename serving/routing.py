"""Which decoding worker serves a page request, and as what: the user's experiment arm (the worker of the
arm's checkpoint, the arm's decoding settings), then the exploration share. The experiment file is re-read
by `refresh` (the server calls it from a watcher thread)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from homegen.serving.experiments import Experiment, ExperimentFile
from homegen.serving.requests import PageRequest
from homegen.serving.traffic import Exploration
from homegen.serving.worker import DecodeWorker, EngineSlot

log = logging.getLogger("homegen.serve")


@dataclasses.dataclass(frozen=True)
class Route:
    request: PageRequest  # as it is to be decoded
    worker: DecodeWorker
    experiment: str | None = None
    arm: str | None = None


class TrafficRouter:
    """One decoding worker per checkpoint served (the server's own, and each experiment arm's), and the
    routing of requests to them. `new_worker(slot)` starts a worker; `arm_engine(path)` loads (and warms up)
    an arm checkpoint's engine, before the experiment that names it takes effect."""

    def __init__(self, slot: EngineSlot, new_worker: Callable[[EngineSlot], DecodeWorker],
                 experiment_file: str | None = None, exploration: Exploration = Exploration(),
                 arm_engine: Callable[[str], object] | None = None):
        self._new_worker, self._arm_engine, self.exploration = new_worker, arm_engine, exploration
        self.main = new_worker(slot)
        self.workers: dict[str | None, DecodeWorker] = {None: self.main}  # by arm checkpoint
        self.experiments = ExperimentFile(experiment_file) if experiment_file else None
        if self.experiments is not None:
            self._start_arms(self.experiments.experiment)

    def _start_arms(self, experiment: Experiment) -> None:
        for arm in experiment.arms:
            if arm.checkpoint is not None and arm.checkpoint not in self.workers:
                if self._arm_engine is None:
                    raise ValueError(f"arm {arm.name!r} names a checkpoint, and this server cannot load one")
                engine = self._arm_engine(arm.checkpoint)
                self.workers[arm.checkpoint] = self._new_worker(EngineSlot(engine, lambda step, e=engine: e))

    def route(self, request: PageRequest) -> Route:
        """Where and how `request` (with its request id) is decoded."""
        experiment = self.experiments.experiment if self.experiments is not None else None
        if experiment is None:
            return Route(self.exploration.apply(request), self.main)
        arm = experiment.assign(request)
        served = self.exploration.apply(Experiment.apply(arm, request))
        return Route(served, self.workers[arm.checkpoint], experiment.name, arm.name)

    def refresh(self) -> bool:
        """Takes the experiment file's new version when it changed (its arms' checkpoints loaded first);
        True when it did. A file that does not read, or an arm that cannot load, raises ValueError (or the
        loader's error) and leaves the experiment in force."""
        try:
            changed = self.experiments.changed()
            if changed is None:
                return False
            self._start_arms(changed)
        except Exception as e:
            self.experiments.last_error = str(e)
            raise
        self.experiments.experiment, self.experiments.last_error = changed, None
        log.info("experiment %r in force: %s", changed.name, ", ".join(f"{a.name} {a.share:g}" for a in changed.arms))
        return True

    def describe(self) -> dict:
        """The experiment in force, for /healthz ({} without one)."""
        if self.experiments is None:
            return {}
        experiment = self.experiments.experiment
        return {"experiment": {"name": experiment.name, "arms": {a.name: a.share for a in experiment.arms},
                               **({"last_error": self.experiments.last_error} if self.experiments.last_error else {})}}

    def stop(self) -> None:
        """Finishes what every worker has queued."""
        for worker in self.workers.values():
            worker.stop()

"""Early stopping: stop a run when its validation metric has not improved for `patience` evaluations.

The tracker's state is a small dict saved with every checkpoint (in the run's `progress`), so a run that is
stopped by a signal or a crash and resumed counts on from where the checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class EarlyStopping:
    """Tracks the best value of `metric` (`mode` max or min) and how many evaluations in a row have not
    beaten it; `patience` 0 never stops."""

    metric: str
    mode: str
    patience: int
    best: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"train.best_mode must be 'max' or 'min', got {self.mode!r}")
        if self.patience < 0:
            raise ValueError(f"train.patience must be >= 0, got {self.patience}")

    @classmethod
    def restore(cls, metric: str, mode: str, patience: int, saved: dict | None) -> EarlyStopping:
        """The tracker as a checkpoint saved it (a fresh one without a saved state, or when the saved state
        tracked another metric)."""
        tracker = cls(metric, mode, patience)
        if saved and saved.get("metric") == metric and saved.get("mode") == mode:
            tracker.best, tracker.best_step = saved["best"], saved["best_step"]
            tracker.evals_since_best = saved["evals_since_best"]
        return tracker

    def state(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best}

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Records one evaluation's metrics (they must hold the tracked metric)."""
        if self.metric not in metrics:
            raise ValueError(f"train.patience watches train.best_metric={self.metric!r}, which the evaluation does "
                             f"not report (it reports: {', '.join(sorted(metrics)) or 'nothing'})")
        value = metrics[self.metric]
        better = math.isfinite(value) and (self.best is None or
                                           (value > self.best if self.mode == "max" else value < self.best))
        if better:
            self.best, self.best_step, self.evals_since_best = value, step, 0
        else:
            self.evals_since_best += 1

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_since_best >= self.patience

    def reason(self) -> str:
        best = f"{self.best:.4f} at step {self.best_step}" if self.best is not None else "none"
        return (f"{self.metric} has not improved for {self.evals_since_best} evaluations "
                f"(train.patience={self.patience}; best {best})")

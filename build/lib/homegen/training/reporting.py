"""Console progress line and TensorBoard event files."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Reporter:
    """Prints `step/total | loss | tokens/s | ETA` and writes scalars to TensorBoard (leader only)."""

    def __init__(self, logdir: str | None, total_steps: int, enabled: bool = True):
        self.total, self.enabled = total_steps, enabled
        self.writer = None
        if enabled and logdir:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir)
        self.begin(0)

    def begin(self, step: int) -> None:
        """Rates and ETA count from here (call when training starts or resumes at `step`)."""
        self._time, self._step, self._tokens = time.time(), step, 0

    def add_tokens(self, count: int) -> None:
        self._tokens += count

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        elapsed = max(now - self._time, 1e-9)
        steps = max(step - self._step, 1)
        rate = self._tokens / elapsed
        eta = (self.total - step) * elapsed / steps
        metrics = {**metrics, "tokens_per_second": rate}
        self.scalars(step, metrics)
        if self.enabled:
            bar = int(20 * step / max(self.total, 1))
            extra = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("loss", "tokens_per_second"))
            print(f"[{'#' * bar}{'.' * (20 - bar)}] step {step}/{self.total} | loss {metrics.get('loss', float('nan')):.4f} "
                  f"| {rate:,.0f} tok/s | ETA {_duration(eta)} | {extra}", flush=True)
        self._time, self._step, self._tokens = now, step, 0

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr if text.startswith("error") else sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer:
            self.writer.close()

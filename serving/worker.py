"""The decoding worker behind the HTTP server: a bounded queue, dynamic batches, per-request deadlines,
isolation of a failing request from its batch (`generate_isolated`, which batch-file mode uses too), and the
engine slot that a newer checkpoint is swapped into without failing a request in flight."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from homegen.serving.requests import PageRequest
from homegen.training.checkpoints import CheckpointError, Checkpoints, checkpoint_dir

log = logging.getLogger("homegen.serve")


def generate_isolated(generate, requests: list) -> list:
    """`generate(requests)`, or where that raises, each request alone: a request that fails by itself gets its
    exception in its place, and the others their responses (one bad request never fails its batch)."""
    try:
        return generate(requests)
    except Exception as e:
        if len(requests) == 1:
            log.exception("request failed")
            return [e]
        log.warning("batch of %d failed (%s); retrying its requests one by one", len(requests), e)
        return [generate_isolated(generate, [request])[0] for request in requests]


class QueueFull(RuntimeError):
    """The server holds as many requests as it may queue: come back later (HTTP 503 + Retry-After)."""


class DeadlinePassed(RuntimeError):
    """The request waited in the queue past its deadline and was not decoded (HTTP 504)."""


@dataclasses.dataclass
class Job:
    request: PageRequest
    future: Future
    deadline: float  # time.monotonic() after which it is not started


class EngineSlot:
    """The engine requests are decoded with, replaceable by a newer checkpoint of the same run: the new
    engine is loaded and compiled on a background thread, then swapped in between two batches."""

    def __init__(self, engine, make_engine: Callable[[int | None], object]):
        self.engine = engine
        self._make = make_engine  # step (None: newest readable) -> a loaded, warmed-up engine
        self._reloading = threading.Lock()
        self.last_reload: dict = {}

    @property
    def step(self) -> int:
        return self.engine.step

    def newest_step(self) -> int | None:
        """The newest step of the engine's run folder (None when it cannot be read)."""
        try:
            steps = Checkpoints(checkpoint_dir(self.engine.path), read_only=True).steps()
        except CheckpointError:
            return None
        return max(steps) if steps else None

    def reload(self, step: int | None = None) -> bool:
        """Starts loading `step` (None: the newest readable) in the background; False when a reload is
        already running."""
        if not self._reloading.acquire(blocking=False):
            return False
        threading.Thread(target=self._load, args=(step,), daemon=True, name="reload").start()
        return True

    @property
    def reloading(self) -> bool:
        return self._reloading.locked()

    def _load(self, step: int | None) -> None:
        start = time.perf_counter()
        try:
            engine = self._make(step)
            previous, self.engine = self.engine.step, engine
            self.last_reload = {"from_step": previous, "to_step": engine.step,
                                "seconds": round(time.perf_counter() - start, 1)}
            log.info("swapped in checkpoint step %d (was %d) after %.1f s", engine.step, previous,
                     time.perf_counter() - start)
        except Exception as e:  # a damaged or missing step: keep serving the one we have
            self.last_reload = {"step": step, "error": f"{type(e).__name__}: {e}"}
            log.exception("reload failed; still serving step %d", self.engine.step)
        finally:
            self._reloading.release()


class DecodeWorker:
    """One thread decodes batches of up to `max_batch` requests taken from a queue of at most `max_queue`;
    a request that waited past its deadline is failed with DeadlinePassed instead of being decoded."""

    def __init__(self, slot: EngineSlot, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int, float], None] = lambda size, seconds: None):
        self.slot, self.max_batch, self.max_wait_s = slot, max_batch, max_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch
        self._thread = threading.Thread(target=self._run, daemon=True, name="decoder")
        self._thread.start()

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, request: PageRequest, deadline_s: float) -> Future:
        """A future of the request's response; raises QueueFull at once when the queue is full."""
        job = Job(request, Future(), time.monotonic() + deadline_s)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are waiting") from None
        return job.future

    def stop(self) -> None:
        """Finishes what is queued, then ends the thread."""
        self._queue.put(None)
        self._thread.join()

    def _take_batch(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=self.max_wait_s)
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            now = time.monotonic()
            live = []
            for job in batch:
                if not job.future.set_running_or_notify_cancel():
                    continue  # its client went away
                if now > job.deadline:
                    job.future.set_exception(DeadlinePassed("the request waited in the queue past its deadline"))
                else:
                    live.append(job)
            if not live:
                continue
            engine = self.slot.engine  # a swap takes effect from the next batch on
            start = time.perf_counter()
            outcomes = generate_isolated(engine.generate, [job.request for job in live])
            self._on_batch(len(live), time.perf_counter() - start)
            for job, outcome in zip(live, outcomes):
                if isinstance(outcome, Exception):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

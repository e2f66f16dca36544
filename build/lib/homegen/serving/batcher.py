"""Dynamic batching: concurrent requests wait up to `max_wait_s` to be decoded together."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from homegen.serving.requests import PageRequest

log = logging.getLogger("homegen.serve")


class Batcher:
    """Collects requests from many threads and runs `generate(list) -> list` on batches of them."""

    def __init__(self, generate, max_batch: int = 16, max_wait_s: float = 0.01):
        self.generate, self.max_batch, self.max_wait_s = generate, max_batch, max_wait_s
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, daemon=True, name="batcher")
        self._worker.start()

    def submit(self, request: PageRequest) -> Future:
        future: Future = Future()
        self._queue.put((request, future))
        return future

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=self.max_wait_s))
                except queue.Empty:
                    break
            try:
                results = self.generate([request for request, _ in batch])
            except Exception as e:  # a bug must not kill the worker: fail this batch, keep serving
                log.exception("batch of %d failed", len(batch))
                for _, future in batch:
                    future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)

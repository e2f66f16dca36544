"""Dynamic batching: concurrent requests wait up to `max_wait_s` to be decoded together; a batch that fails
is retried request by request, so an exception fails only the request that causes it."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from homegen.serving.requests import PageRequest

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
            for (_, future), outcome in zip(batch, generate_isolated(self.generate, [r for r, _ in batch])):
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

"""Impression logs: every page served, appended as a FORMATS.md §3 page-log line, and the outcome events
that clients send later; joined by request id into page logs that train.py and scripts/ope.py read.

Durability (the flush policy): `RotatingLog.append` hands a record to one writer thread and returns a future
that resolves once the record's line has been written to the operating system (`os.write` on a file opened
for appending), in batches of whatever is waiting (group commit). The server answers a request only after
that, so a process killed at any moment (even `kill -9`) has every answered request's line on disk; the
file is fsynced every `fsync_s` seconds and when it is rotated or closed, which bounds what a machine crash
can lose. A line is written whole by one `write` call, so a crash mid-write leaves at most a torn last line,
of a request that was never answered; `read_log_lines` reports and skips it.

Bounded: a file is rotated when it would pass `max_bytes` or is older than `max_age_s`; `keep_files` > 0
deletes the oldest beyond that many. The folder is made when missing; one that cannot be made or written
(read-only, full, a file in its place) never fails a request: the records are counted as dropped with the
reason, a log line says what failed (at most once a minute), and every later batch tries again, so writing
resumes when the folder recovers.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from homegen.data.formats import DataFormatError, json_lines

log = logging.getLogger("homegen.impressions")
EVENTS = ("stream", "skip", "save")  # what POST /v1/events accepts; streams count "stream" events


@dataclasses.dataclass(frozen=True)
class LogSettings:
    max_bytes: int = 64 << 20  # rotate before a file passes this
    max_age_s: float = 3600.0  # or once it is this old
    fsync_s: float = 1.0  # fsync the open file at most this long after a write
    keep_files: int = 0  # > 0: delete the oldest files of this log beyond this many


class RotatingLog:
    """Appends JSON records as lines to `folder/PREFIX-YYYYmmddTHHMMSS-PID-SEQ.jsonl`, off the caller's thread
    (see the module's docstring for what is guaranteed). `on_written(n)` and `on_dropped(n, reason)` are
    called from the writer thread, e.g. to count them in metrics."""

    def __init__(self, folder: str, prefix: str, settings: LogSettings = LogSettings(),
                 on_written: Callable[[int], None] = lambda n: None,
                 on_dropped: Callable[[int, str], None] = lambda n, reason: None):
        self.folder, self.prefix, self.settings = folder, prefix, settings
        self.on_written, self.on_dropped = on_written, on_dropped
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._fd: int | None = None
        self._size, self._opened, self._synced, self._sequence, self._last_error_log = 0, 0.0, True, 0, 0.0
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"log-{prefix}")
        self._thread.start()

    def append(self, record: dict) -> Future:
        """Queues `record`; the future's result is True once its line is written, False if it was dropped."""
        future: Future = Future()
        self._queue.put((json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n", future))
        return future

    def close(self, timeout_s: float = 30.0) -> None:
        """Writes what is queued, fsyncs and closes the file."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.settings.fsync_s if self.settings.fsync_s > 0 else None)
            except queue.Empty:
                self._sync()
                continue
            batch, stop = [], first is None
            if first is not None:
                batch.append(first)
            while not stop:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._write(batch)
            if stop:
                self._close_file()
                return

    def _write(self, batch: list[tuple[bytes, Future]]) -> None:
        """Writes `batch` in as few `write` calls as the rotation allows (a chunk per file), then resolves the
        futures of each chunk."""
        chunk: list[tuple[bytes, Future]] = []
        size = self._size if self._fd is not None else 0  # of the file the chunk will go to
        for line, future in batch:
            if chunk and size + len(line) > self.settings.max_bytes:
                self._write_chunk(chunk)
                chunk, size = [], 0  # the next chunk starts a new file
            chunk.append((line, future))
            size += len(line)
        self._write_chunk(chunk)

    def _write_chunk(self, chunk: list[tuple[bytes, Future]]) -> None:
        data = b"".join(line for line, _ in chunk)
        try:
            self._ensure_file(len(data))
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            self._size += len(data)
            self._synced = False
            ok, reason = True, ""
        except OSError as e:
            ok, reason = False, errno.errorcode.get(e.errno, "OSError") if e.errno else type(e).__name__
            self._report(e)
            self._close_file(sync=False)  # the next batch opens a new file, once the folder recovers
        for _, future in chunk:
            future.set_result(ok)
        if ok:
            self.on_written(len(chunk))
            if self.settings.fsync_s <= 0:  # fsync every batch
                self._sync()
        else:
            self.on_dropped(len(chunk), reason)

    def _ensure_file(self, incoming: int) -> None:
        """Opens a new file when none is open, or when `incoming` more bytes would pass the size limit (of a
        file that holds something) or the open one is too old."""
        now = time.time()
        if self._fd is not None and ((self._size and self._size + incoming > self.settings.max_bytes)
                                     or now - self._opened > self.settings.max_age_s):
            self._close_file()
        if self._fd is None:
            self._sequence += 1
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
            path = os.path.join(self.folder, f"{self.prefix}-{stamp}-{os.getpid()}-{self._sequence:06d}.jsonl")
            os.makedirs(self.folder, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._size, self._opened = 0, now
            self._prune()

    def _sync(self) -> None:
        if self._fd is not None and not self._synced:
            try:
                os.fsync(self._fd)
                self._synced = True
            except OSError as e:
                self._report(e)

    def _close_file(self, sync: bool = True) -> None:
        if self._fd is None:
            return
        if sync:
            self._sync()
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd, self._synced = None, True

    def _prune(self) -> None:
        if self.settings.keep_files <= 0:
            return
        files = log_files(self.folder, self.prefix)
        for old in files[:max(0, len(files) - self.settings.keep_files)]:
            try:
                os.remove(old)
            except OSError as e:
                self._report(e)

    def _report(self, error: OSError) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 60.0:
            self._last_error_log = now
            log.error("%s log in %s cannot be written (%s): records are dropped and counted until it can",
                      self.prefix, self.folder, error)


def log_files(folder: str, prefix: str) -> list[str]:
    """The files of one log in `folder`, oldest first (their names sort by time, then process and sequence)."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), f"{prefix}-*.jsonl")),
                  key=lambda p: (os.path.basename(p).split("-")[1], os.path.getmtime(p), p))


def impression_record(request, response: dict) -> dict:
    """The FORMATS.md §3 page-log line of one served page: the request as the model saw it (session events
    folded into history and exclusions), the page with its propensities, and how it was decoded."""
    context = dict(request.context)
    if request.intent:
        context["intent"] = request.intent
    page = [{"shelf": shelf["shelf"], "items": shelf["items"],
             **({"propensities": shelf["propensities"]} if "propensities" in shelf else {})}
            for shelf in response["page"]]
    record = {"request_id": request.request_id, "user_id": request.user_id,
              "timestamp": round(time.time(), 3), "context": context,
              "history": request.history, "page": page, "checkpoint_step": response["checkpoint_step"],
              "decoding": ({"temperature": request.temperature, "top_k": request.top_k, "top_p": request.top_p,
                            "num_pages": request.num_pages, **({"exploration": True} if request.exploration else {})}
                           if request.temperature > 0 else {"beam_size": request.beam_size})}
    if "log_propensity" in response:
        record["log_propensity"] = response["log_propensity"]
    if response.get("arm") is not None:
        record["experiment"], record["arm"] = response["experiment"], response["arm"]
    return record


def parse_events(obj) -> list[dict]:
    """The event records of one POST /v1/events body: {"request_id": ID, "events": [{"item", "event"}, ...]}
    or a list of such objects. ValueError names what is wrong."""
    batches = obj if isinstance(obj, list) else [obj]
    records = []
    for k, batch in enumerate(batches):
        where = f"entry {k}: " if isinstance(obj, list) else ""
        if not isinstance(batch, dict) or not isinstance(batch.get("request_id"), str) or not batch["request_id"]:
            raise ValueError(f'{where}expected {{"request_id": "...", "events": [{{"item": ..., "event": ...}}]}}')
        events = batch.get("events")
        if not isinstance(events, list) or not events:
            raise ValueError(f"{where}'events' must be a non-empty list")
        for j, event in enumerate(events):
            if not isinstance(event, dict) or not isinstance(event.get("item"), str) or event.get("event") not in EVENTS:
                raise ValueError(f"{where}events[{j}] must be {{\"item\": ID, \"event\": one of {list(EVENTS)}}}")
        records.append({"request_id": batch["request_id"], "events": [{"item": e["item"], "event": e["event"]}
                                                                      for e in events]})
    return records


def read_log_lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a log file. A malformed line raises DataFormatError naming file and line,
    except an unterminated last line (a crash mid-write, whose request was never answered): skipped with a
    warning."""
    torn = _unterminated_last_line(path)
    try:
        for number, record in json_lines(path):
            if number == torn:
                break
            if not isinstance(record.get("request_id"), str):
                raise DataFormatError(path, number, "a log record must be an object with a 'request_id'")
            yield number, record
    except DataFormatError as e:
        if e.line != torn:
            raise
    if torn:
        log.warning("%s:%d: an unterminated last line (a write cut short by a crash) was skipped", path, torn)


def _unterminated_last_line(path: str) -> int | None:
    """The number of the file's last line when it does not end with a newline (only then is the file read
    through, to count its lines), else None."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return None
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return None
        f.seek(0)
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) + 1


@dataclasses.dataclass
class JoinSummary:
    pages: int = 0
    with_events: int = 0
    streams: int = 0
    events_without_impression: int = 0


def join_logs(impressions: str, events: str | None, output: str) -> JoinSummary:
    """Writes the page logs (FORMATS.md §3) of every impression in folder `impressions`, with `streams` per
    item counted from the "stream" events (folder `events`, default the same) that carry its request id and
    item (0 where none did). The output is what `train.py --config.data.page_logs=` and `scripts/ope.py`
    read."""
    by_request: dict[str, dict[str, int]] = {}
    for path in log_files(events or impressions, "events"):
        for _, record in read_log_lines(path):
            counts = by_request.setdefault(record["request_id"], {})
            for event in record.get("events", []):
                if event.get("event") == "stream":
                    counts[event["item"]] = counts.get(event["item"], 0) + 1
                else:
                    counts.setdefault(event["item"], 0)
    summary, seen = JoinSummary(), set()
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for path in log_files(impressions, "impressions"):
            for _, record in read_log_lines(path):
                counts = by_request.get(record["request_id"], {})
                seen.add(record["request_id"])
                summary.with_events += bool(counts)
                for shelf in record["page"]:
                    shelf["streams"] = [counts.get(item, 0) for item in shelf["items"]]
                    summary.streams += sum(shelf["streams"])
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                summary.pages += 1
    os.replace(tmp, output)
    summary.events_without_impression = len(set(by_request) - seen)
    return summary

"""Runs the synthetic world forward and writes its logs in the formats of FORMATS.md.

Pages are simulated in chunks (vectorised), so memory stays bounded by the catalog, the users' history
buffers and one chunk, and every line is streamed to disk.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Iterator

import numpy as np

from homegen.data.simulator.policies import PlackettLucePolicy, SamplingPolicy
from homegen.data.simulator.response import PageBatch, ResponseModel
from homegen.data.simulator.shelves import SHELF_NAMES, ShelfRules
from homegen.data.simulator.world import EPOCH, Catalog, Contexts, World, WorldConfig, sample_contexts

LOG_DAYS = 90
SECONDS_PER_DAY = 86_400
_EPOCH_SECONDS = (EPOCH - datetime.date(1970, 1, 1)).days * SECONDS_PER_DAY


class HistoryBuffer:
    """The last `length` streamed items of every user, as a ring buffer."""

    def __init__(self, num_users: int, length: int):
        self.buffer = np.full((num_users, length), -1, np.int32)
        self.count = np.zeros(num_users, np.int64)

    def get(self, users: np.ndarray) -> np.ndarray:
        """(B, length) histories, right-aligned (most recent last), -1 padded on the left."""
        length = self.buffer.shape[1]
        pos = self.count[users, None] - length + np.arange(length)
        hist = self.buffer[users[:, None], pos % length]
        return np.where(pos >= 0, hist, -1)

    def append(self, user: int, items: np.ndarray) -> None:
        length = self.buffer.shape[1]
        for item in items[-length:]:
            self.buffer[user, self.count[user] % length] = item
            self.count[user] += 1


class Simulator:
    """Draws requests, builds logged pages with the logging policy and samples the users' streams. With
    `propensities` the logging policy is `PlackettLucePolicy` (full shelves, every choice's probability
    known and logged); otherwise the heuristic `SamplingPolicy` (4 to 10 items per shelf, no propensities)."""

    def __init__(self, world: World, seed: int | None = None, propensities: bool = False):
        self.world = world
        self.rules = ShelfRules(world)
        self.response = ResponseModel(world, self.rules)
        self.policy = (PlackettLucePolicy if propensities else SamplingPolicy)(world, self.rules)
        self.rng = np.random.default_rng((world.config.seed, 1) if seed is None else seed)
        self.history = HistoryBuffer(world.users.num_users, world.config.history_len)
        self._user_cdf = np.cumsum(world.users.activity)
        self._seed_histories()

    def _seed_histories(self, length: int = 10) -> None:
        """Every user starts with a few tracks from genres they like."""
        w, c, rng = self.world.users, self.world.catalog, self.rng
        order = np.argsort(c.genre, kind="stable")
        starts = np.searchsorted(c.genre[order], np.arange(c.genre.max() + 2))
        for k in range(length):
            cdf = np.cumsum(w.genre_taste, axis=1)
            g = np.minimum((cdf < rng.random((w.num_users, 1))).sum(axis=1), len(starts) - 2)
            size = np.maximum(starts[g + 1] - starts[g], 1)
            items = order[np.minimum(starts[g] + (rng.random(w.num_users) * size).astype(np.int64), len(order) - 1)]
            self.history.buffer[:, k] = items
        self.history.count[:] = length

    def requests(self, size: int, day: np.ndarray) -> tuple[np.ndarray, Contexts, np.ndarray]:
        users = np.minimum(np.searchsorted(self._user_cdf, self.rng.random(size) * self._user_cdf[-1]),
                           self.world.users.num_users - 1)
        return users, sample_contexts(self.world.users, users, day, self.rng), self.history.get(users)

    def logged_pages(self, users, ctx, history) -> tuple[PageBatch, np.ndarray, np.ndarray | None]:
        """The logging policy's pages for a batch of requests, the users' sampled streams and the pages'
        propensities (B, S, L) (None for a policy that does not log them)."""
        cfg = self.world.config
        props = None
        if isinstance(self.policy, PlackettLucePolicy):
            shelves, items, props = self.policy.build_with_propensities(users, ctx, history, self.rng,
                                                                        cfg.num_shelves, cfg.max_items)
        else:
            shelves, items = self.policy.build(users, ctx, history, self.rng, cfg.num_shelves, cfg.min_items,
                                               cfg.max_items)
        batch = PageBatch(users, ctx, history, shelves, items)
        return batch, self.response.sample_streams(batch, self.rng), props

    def run(self, num_pages: int, chunk: int = 1024) -> Iterator[dict]:
        """Yields page-log records (FORMATS.md §3) in time order; users' histories grow with their streams."""
        cfg = self.world.config
        start_day = cfg.now_day - LOG_DAYS
        for begin in range(0, num_pages, chunk):
            size = min(chunk, num_pages - begin)
            index = begin + np.arange(size)
            day = start_day + (index * LOG_DAYS) // max(num_pages, 1)
            users, ctx, history = self.requests(size, day)
            batch, streams, props = self.logged_pages(users, ctx, history)
            seconds = self.rng.integers(0, 3600, size)
            for row in range(size):
                timestamp = _EPOCH_SECONDS + int(day[row]) * SECONDS_PER_DAY + int(ctx.hour[row]) * 3600 + int(seconds[row])
                record = page_record(self.world, batch, row, streams, f"r-{begin + row:09d}", timestamp, props)
                streamed = batch.items[row][streams[row] > 0]
                if len(streamed):
                    self.history.append(int(users[row]), streamed)
                yield record


def item_ids(world: World, items: np.ndarray) -> list[str]:
    """The catalog ids of item indices, -1 padding left out."""
    return [world.catalog.item_id(int(i)) for i in items if i >= 0]


def page_record(world: World, batch: PageBatch, row: int, streams: np.ndarray | None, request_id: str,
                timestamp: int, propensities: np.ndarray | None = None) -> dict:
    """A FORMATS.md §3 page-log record of one row of a batch (streams omitted when None; with
    `propensities`, each shelf's `propensities` and the page's `log_propensity`, their log-sum)."""
    page, log_propensity = [], 0.0
    for s, shelf in enumerate(batch.shelves[row]):
        if shelf < 0:
            continue
        items = batch.items[row, s]
        entry = {"shelf": SHELF_NAMES[shelf], "items": item_ids(world, items)}
        if streams is not None:
            entry["streams"] = [int(v) for v, i in zip(streams[row, s], items) if i >= 0]
        if propensities is not None:
            probs = [float(p) for p, i in zip(propensities[row, s], items) if i >= 0]
            entry["propensities"] = [float(f"{p:.6g}") for p in probs]
            log_propensity += float(np.log(probs).sum())
        page.append(entry)
    record = {"request_id": request_id, "user_id": world.user_id(int(batch.users[row])), "timestamp": timestamp,
              "context": batch.contexts.record(row), "history": item_ids(world, batch.history[row]), "page": page}
    if propensities is not None:
        record["log_propensity"] = round(log_propensity, 6)
    return record


def write_catalog(catalog: Catalog, out_dir: str, chunk: int = 100_000) -> str:
    """Writes the catalog's catalog.jsonl to out_dir, `chunk` lines per write; returns its path."""
    path = os.path.join(out_dir, "catalog.jsonl")
    with open(path, "w") as f:
        for start in range(0, catalog.num_items, chunk):
            stop = min(start + chunk, catalog.num_items)
            f.write("".join(json.dumps(r) + "\n" for r in catalog.records(start, stop)))
    return path


def write_world(config: WorldConfig, out_dir: str, num_pages: int, num_requests: int,
                progress=None, propensities: bool = False) -> dict:
    """Writes catalog.jsonl, pages.jsonl, requests.jsonl (+ heldout_pages.jsonl, world.json) to out_dir; with
    `propensities` the logging policy is `PlackettLucePolicy` and the page logs carry its propensities."""
    os.makedirs(out_dir, exist_ok=True)
    world = World(config)
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)
    write_catalog(world.catalog, out_dir)
    sim = Simulator(world, propensities=propensities)
    with open(os.path.join(out_dir, "pages.jsonl"), "w") as f:
        for k, record in enumerate(sim.run(num_pages)):
            f.write(json.dumps(record) + "\n")
            if progress and (k + 1) % 100_000 == 0:
                progress(k + 1)
    users, ctx, history = sim.requests(num_requests, np.full(num_requests, config.now_day))
    batch, streams, props = sim.logged_pages(users, ctx, history)
    timestamp = _EPOCH_SECONDS + config.now_day * SECONDS_PER_DAY
    with open(os.path.join(out_dir, "requests.jsonl"), "w") as req, \
            open(os.path.join(out_dir, "heldout_pages.jsonl"), "w") as held:
        for row in range(num_requests):
            record = page_record(world, batch, row, streams, f"q-{row:07d}", timestamp + int(ctx.hour[row]) * 3600,
                                 props)
            held.write(json.dumps(record) + "\n")
            request = {k: record[k] for k in ("request_id", "user_id", "history", "context")}
            request.update(num_shelves=config.num_shelves, min_items_per_shelf=config.min_items,
                           max_items_per_shelf=config.max_items)
            req.write(json.dumps(request) + "\n")
    return {"world": world, "simulator": sim, "requests": (users, ctx, history), "logged": batch}

"""Which items may stand on which shelf, in the two parts constrained decoding takes: what holds for every
request, once per checkpoint, and the short list of pairs that depends on the request's history."""

from __future__ import annotations

import numpy as np

from homegen.data.simulator.shelves import ShelfRules
from homegen.data.simulator.world import World, WorldConfig
from homegen.data.vocab import Vocabulary


class Eligibility:
    """Eligibility over the vocabulary's shelves (S) and items (N), from a checkpoint's spec: the synthetic
    world's rules, the shelf/item pairs seen in the logs (`observed`), or anything (`all`).

    `static` (S, N) holds for every request; `dynamic_pairs(history)` lists the (shelf, item) pairs of the
    shelves whose rule reads the user's history (the world's "recently played", "because you listened"),
    whose static rows are empty."""

    def __init__(self, spec: dict, vocab: Vocabulary):
        self.vocab, self.kind = vocab, spec.get("kind", "all")
        s, n = len(vocab.shelves), vocab.items.num_items
        self.static = np.ones((s, n), bool)
        self._dynamic: list[tuple[int, int]] = []  # (vocab shelf, world shelf) whose rule reads the history
        if self.kind == "observed":
            self.static[:] = False
            for shelf, items in spec["shelf_items"].items():
                row = vocab.shelves.index(shelf) if shelf in vocab.shelves else None
                if row is not None:
                    self.static[row, [vocab.items.index[i] for i in items if i in vocab.items.index]] = True
        elif self.kind == "world":
            self.world = World(WorldConfig(**spec["world"]))
            self.rules = ShelfRules(self.world)
            world_index = np.array([self.world.lookup_item(i) for i in vocab.items.item_ids])
            known = world_index >= 0
            self._vocab_index = np.full(self.world.catalog.num_items, -1, np.int64)  # world item -> vocab item
            self._vocab_index[world_index[known]] = np.flatnonzero(known)
            for row, name in enumerate(vocab.shelves):
                self.static[row] = False
                if name not in self.rules.index:
                    continue
                t = self.rules.index[name]
                if self.rules.is_static(t):
                    items = self._vocab_index[self.rules.static_pool(t)]
                    self.static[row, items[items >= 0]] = True
                else:
                    self._dynamic.append((row, t))
        self.static_counts = self.static.sum(axis=1)

    def dynamic_pairs(self, history: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shelves, items) int32: the distinct (shelf, item) pairs eligible for a user with `history` on the
        history-dependent shelves; their size follows the history, not the catalog."""
        shelves, items = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
        if self._dynamic:
            hist = np.array([self.world.lookup_item(i) for i in history], np.int64)
            hist = hist[hist >= 0]
            for row, t in self._dynamic:
                pool = np.unique(self._vocab_index[self.rules.pool(t, hist)])
                pool = pool[pool >= 0].astype(np.int32)
                shelves.append(np.full(len(pool), row, np.int32))
                items.append(pool)
        return np.concatenate(shelves), np.concatenate(items)

    def matrix(self, history: list[str]) -> np.ndarray:
        """The dense (S, N) eligibility of one request: for the pointwise baseline, benchmarks and tests;
        serving never builds it."""
        if not self._dynamic:
            return self.static
        out = self.static.copy()
        shelves, items = self.dynamic_pairs(history)
        out[shelves, items] = True
        return out

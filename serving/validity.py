"""Checks a served page against every rule of the grammar and of its request.

Shelf eligibility is judged here item by item, by id, from the checkpoint's eligibility spec (the synthetic
world's shelf rules, or the shelf/item pairs seen in the logs), not from the (shelves x items) mask the
decoder applies: a bug in building that mask shows up as a violation instead of agreeing with itself.
"""

from __future__ import annotations

import numpy as np

from homegen.data.simulator.shelves import ShelfRules
from homegen.data.simulator.world import World, WorldConfig
from homegen.data.vocab import Vocabulary
from homegen.serving.requests import PageRequest


class PageValidator:
    """The rules a page must keep, for one checkpoint's vocabulary and eligibility spec."""

    def __init__(self, vocab: Vocabulary, eligibility_spec: dict):
        self.vocab, self.kind = vocab, eligibility_spec.get("kind", "all")
        if self.kind == "world":
            self.world = World(WorldConfig(**eligibility_spec["world"]))
            self.rules = ShelfRules(self.world)
        elif self.kind == "observed":
            self.pairs = {shelf: frozenset(items) for shelf, items in eligibility_spec["shelf_items"].items()}
        elif self.kind != "all":
            raise ValueError(f"unknown eligibility kind {self.kind!r}")

    def eligible(self, shelf: str, items: list[str], history: list[str]) -> list[bool]:
        """Whether each item may stand on `shelf` for a user with `history` (item ids, oldest first)."""
        if self.kind == "all":
            return [True] * len(items)
        if self.kind == "observed":
            allowed = self.pairs.get(shelf, frozenset())
            return [item in allowed for item in items]
        if shelf not in self.rules.index:
            return [False] * len(items)
        known = [k for k in map(self.world.lookup_item, history) if k >= 0]
        pool = set(self.rules.pool(self.rules.index[shelf], np.array(known, np.int64)).tolist())
        return [self.world.lookup_item(item) in pool for item in items]  # -1 is never in a pool

    def violations(self, request: PageRequest, page: list[dict]) -> list[str]:
        """The rules `page` breaks (empty when valid): shelf count, shelf allow-list, repeated shelves, items
        per shelf, unknown or ineligible items, exclusions, duplicate items."""
        problems = []
        shelves = [s["shelf"] for s in page]
        if not 1 <= len(shelves) <= request.num_shelves:
            problems.append(f"{len(shelves)} shelves (allowed 1..{request.num_shelves})")
        if len(set(shelves)) != len(shelves):
            problems.append("a shelf type repeats")
        seen: set[str] = set()
        for shelf in page:
            name, items = shelf["shelf"], shelf["items"]
            if name not in self.vocab.shelves:
                problems.append(f"unknown shelf {name}")
                continue
            if request.allowed_shelves is not None and name not in request.allowed_shelves:
                problems.append(f"shelf {name} not allowed")
            if not request.min_items_per_shelf <= len(items) <= request.max_items_per_shelf:
                problems.append(f"shelf {name} has {len(items)} items")
            for item, ok in zip(items, self.eligible(name, items, request.history)):
                if self.vocab.items.encode(item) is None:
                    problems.append(f"unknown item {item}")
                elif not ok:
                    problems.append(f"item {item} not eligible for {name}")
                if item in request.exclude_items:
                    problems.append(f"excluded item {item}")
                if item in seen:
                    problems.append(f"item {item} twice")
                seen.add(item)
        return problems

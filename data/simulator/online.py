"""The synthetic world as live traffic: a day's requests from its users (FORMATS.md §4) and what each user
does with the page a server answered, drawn from the world's response model; users' histories grow with
what they streamed, so later days see the effect of earlier pages."""

from __future__ import annotations

import numpy as np

from homegen.data.simulator.response import PageBatch
from homegen.data.simulator.simulate import Simulator, item_ids
from homegen.data.simulator.world import World, WorldConfig


class OnlineWorld:
    def __init__(self, config: WorldConfig, seed: int = 0):
        self.world = World(config)
        self.sim = Simulator(self.world, seed=seed)

    def requests(self, day: int, size: int) -> tuple[list[dict], tuple]:
        """`size` requests of day `day` (users drawn by their activity, with their current histories and a
        context of that day), and the state `outcomes` needs to judge the pages answered for them."""
        cfg = self.world.config
        users, ctx, history = self.sim.requests(size, np.full(size, day))
        requests = [{"user_id": self.world.user_id(int(users[row])), "history": item_ids(self.world, history[row]),
                     "context": ctx.record(row), "num_shelves": cfg.num_shelves,
                     "min_items_per_shelf": cfg.max_items, "max_items_per_shelf": cfg.max_items}
                    for row in range(size)]
        return requests, (users, ctx, history)

    def outcomes(self, state: tuple, pages: list[list[dict] | None]) -> list[dict]:
        """Per request, the items its user streamed and skipped on the answered page (None: no page, nothing
        happens), drawn under the world's response model; streams join the user's history."""
        users, ctx, history = state
        cfg = self.world.config
        shelves = np.full((len(pages), cfg.num_shelves), -1, np.int32)
        items = np.full((len(pages), cfg.num_shelves, cfg.max_items), -1, np.int32)
        for row, page in enumerate(pages):
            for s, shelf in enumerate((page or [])[:cfg.num_shelves]):
                shelves[row, s] = self.sim.rules.index.get(shelf["shelf"], -1)
                ids = [self.world.item_index(i) for i in shelf["items"][:cfg.max_items]]
                items[row, s, :len(ids)] = ids
        streams, skips = self.sim.response.sample_events(PageBatch(users, ctx, history, shelves, items), self.sim.rng)
        results = []
        for row in range(len(pages)):
            streamed = items[row][streams[row] > 0]
            if len(streamed):
                self.sim.history.append(int(users[row]), streamed)
            results.append({"streamed": item_ids(self.world, streamed), "skipped": item_ids(self.world, items[row][skips[row] > 0])})
        return results

"""Shelf types of the synthetic world and their eligibility rules.

A shelf is eligible-by-rule: "new releases" holds only tracks released in the last N days,
"because you listened" only tracks by artists similar to the user's recent ones, and so on.
"""

from __future__ import annotations

import numpy as np

from homegen.data.simulator.world import GENRES, MOODS, World

HISTORY_SHELVES = ("because_you_listened", "recently_played")
BASE_SHELVES = ("made_for_you", "new_releases", "popular_now", "discover", "throwback", "workout",
                "focus") + HISTORY_SHELVES
THROWBACK_DAYS = 2500
SEED_HISTORY = 10  # "because you listened" looks at the artists of this many recent tracks


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("&", "n")


SHELF_NAMES: tuple[str, ...] = (BASE_SHELVES + tuple(f"genre_{_slug(g)}" for g in GENRES)
                                + tuple(f"mood_{m}" for m in MOODS))
SHELF_TITLES: dict[str, str] = {
    "made_for_you": "Made for you", "new_releases": "New releases", "popular_now": "Popular right now",
    "discover": "Discover something new", "throwback": "Throwback", "workout": "Workout",
    "focus": "Deep focus", "because_you_listened": "Because you listened to your favourites",
    "recently_played": "Recently played",
    **{f"genre_{_slug(g)}": f"{g.title()} mix" for g in GENRES},
    **{f"mood_{m}": f"{m.title()} vibes" for m in MOODS},
}


class ShelfRules:
    """Eligibility of every item for every shelf type, given the user's history."""

    def __init__(self, world: World):
        c, cfg = world.catalog, world.config
        self.world = world
        self.names = SHELF_NAMES
        self.index = {name: k for k, name in enumerate(SHELF_NAMES)}
        masks = {
            "made_for_you": np.ones(c.num_items, bool),
            "new_releases": c.release_day >= cfg.now_day - cfg.new_release_days,
            "popular_now": c.popularity >= np.quantile(c.popularity, 0.95),
            "discover": c.popularity <= np.median(c.popularity),
            "throwback": c.release_day <= cfg.now_day - THROWBACK_DAYS,
            "workout": c.energy >= 0.7,
            "focus": c.energy <= 0.35,
        }
        for g, genre in enumerate(GENRES):
            masks[f"genre_{_slug(genre)}"] = (c.genre == g) | (c.second_genre == g)
        for m, mood in enumerate(MOODS):
            masks[f"mood_{mood}"] = c.mood == m
        self._static = {self.index[name]: np.flatnonzero(mask).astype(np.int32) for name, mask in masks.items()}
        order = np.argsort(c.style_key, kind="stable").astype(np.int32)
        self.by_style = order
        self.style_start = np.searchsorted(c.style_key[order], np.arange(c.style_key.max() + 2))

    def is_static(self, shelf: int) -> bool:
        return shelf in self._static

    def static_pool(self, shelf: int) -> np.ndarray:
        """Item indices eligible for a shelf type whose rule does not depend on the user."""
        return self._static[shelf]

    def seed_styles(self, history: np.ndarray) -> np.ndarray:
        """Artist-style keys that a "because you listened" shelf may draw from."""
        recent = history[history >= 0][-SEED_HISTORY:]
        return np.unique(self.world.catalog.style_key[recent])

    def style_items(self, style: int) -> np.ndarray:
        return self.by_style[self.style_start[style]:self.style_start[style + 1]]

    def pool(self, shelf: int, history: np.ndarray) -> np.ndarray:
        """Item indices eligible for `shelf` for a user with `history` (item indices, -1 padded)."""
        if shelf in self._static:
            return self._static[shelf]
        name = self.names[shelf]
        if name == "recently_played":
            return np.unique(history[history >= 0]).astype(np.int32)
        styles = self.seed_styles(history)
        if len(styles) == 0:
            return np.zeros(0, np.int32)
        return np.sort(np.concatenate([self.style_items(s) for s in styles]))

    def eligible_mask(self, shelf: int, history: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.world.catalog.num_items, bool)
        mask[self.pool(shelf, history)] = True
        return mask

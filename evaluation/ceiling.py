"""How much of the oracle's page value is reachable from what a request tells.

The oracle (`OraclePolicy`) builds pages knowing each user's latent state: genre and mood tastes, energy,
novelty appetite and favourite artists. A recommender sees only the request (context and the last streamed
items). `informed_oracle_values` runs the same greedy page search on a response model whose user state is
estimated from the request's history (plug-in estimates, one latent factor at a time or all together) and
judges the pages under the true model: the gap between the oracle and the all-estimated row is what the
history cannot tell a page builder that knows the world's response form exactly.
"""

from __future__ import annotations

import numpy as np

from homegen.data.simulator.policies import OraclePolicy
from homegen.data.simulator.response import PageBatch, ResponseModel
from homegen.data.simulator.world import GENRES, MOODS, Contexts, Users, World
from homegen.evaluation.pages import standard_error

FACTORS = ("genre_taste", "mood_taste", "energy", "novelty", "favorite_artists")


def estimate_users(world: World, history: np.ndarray) -> dict[str, np.ndarray]:
    """Plug-in estimates of each request's latent user state from its history (R, H) of streamed item
    indices (-1 padded): genre and mood shares of the history (smoothed by the world's Dirichlet priors),
    the mean energy of its items, the prior mean novelty, and its three most repeated artists."""
    c = world.catalog
    valid = history >= 0
    safe = np.maximum(history, 0)
    genre = np.zeros((len(history), len(GENRES)))
    np.add.at(genre, (np.nonzero(valid)[0], c.genre[safe][valid]), 1.0)
    second = valid & (c.second_genre[safe] >= 0)
    np.add.at(genre, (np.nonzero(second)[0], c.second_genre[safe][second]), 0.5)
    mood = np.zeros((len(history), len(MOODS)))
    np.add.at(mood, (np.nonzero(valid)[0], c.mood[safe][valid]), 1.0)
    count = np.maximum(valid.sum(axis=1), 1)
    energy = np.where(valid, c.energy[safe], 0.0).sum(axis=1) / count
    favorites = np.full((len(history), 3), -1, np.int32)
    for row in range(len(history)):
        artists, counts = np.unique(c.artist[history[row][valid[row]]], return_counts=True)
        top = artists[np.argsort(-counts, kind="stable")][:3]
        favorites[row, :len(top)] = top
    return {"genre_taste": ((genre + 0.3) / (genre + 0.3).sum(axis=1, keepdims=True)).astype(np.float32),
            "mood_taste": ((mood + 0.5) / (mood + 0.5).sum(axis=1, keepdims=True)).astype(np.float32),
            "energy": np.where(valid.any(axis=1), energy, 0.5).astype(np.float32),
            "novelty": np.full(len(history), 0.5, np.float32),
            "favorite_artists": favorites}


def _world_of_rows(world: World, users: np.ndarray, replaced: dict[str, np.ndarray]) -> World:
    """A world whose user k is request k's user, with the `replaced` latent factors swapped in."""
    rows = object.__new__(Users)
    for field, value in vars(world.users).items():  # every per-user array, taken at the requests' users
        setattr(rows, field, replaced.get(field, value[users]) if isinstance(value, np.ndarray) else value)
    rows.num_users = len(users)
    copy = object.__new__(World)
    copy.config, copy.catalog, copy.users = world.config, world.catalog, rows
    return copy


def informed_oracle_values(response: ResponseModel, users: np.ndarray, ctx: Contexts, history: np.ndarray,
                           known: tuple[str, ...], estimates: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(R,) exact expected streams of the oracle's greedy pages built by a response model that knows the
    latent factors in `known` and estimates the others from each request's history (`estimates`, by default
    `estimate_users`)."""
    if set(known) - set(FACTORS):
        raise ValueError(f"unknown latent factors {sorted(set(known) - set(FACTORS))}; choose from {FACTORS}")
    unknown = [f for f in FACTORS if f not in known]
    estimates = estimate_users(response.world, history) if estimates is None else estimates
    believed = ResponseModel(_world_of_rows(response.world, users, {f: estimates[f] for f in unknown}),
                             response.rules)
    cfg = response.world.config
    shelves, items = OraclePolicy(believed).build(np.arange(len(users)), ctx, history, cfg.num_shelves,
                                                  cfg.max_items)
    return response.expected_engagement(PageBatch(users, ctx, history, shelves, items))


def ceiling_table(response: ResponseModel, users: np.ndarray, ctx: Contexts, history: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Per-request values of the oracle (everything known), the oracle estimating every factor from the
    history, and the oracle estimating one factor at a time (the others known)."""
    estimates = estimate_users(response.world, history)

    def value(known: tuple[str, ...]) -> np.ndarray:
        return informed_oracle_values(response, users, ctx, history, known, estimates)

    table = {"oracle (user state known)": value(FACTORS), "oracle, user state estimated from the history": value(())}
    for factor in FACTORS:
        table[f"oracle, only {factor} estimated"] = value(tuple(f for f in FACTORS if f != factor))
    return table


def as_rows(values: dict[str, np.ndarray]) -> list[dict]:
    """Table rows: mean, share of the first row's mean, standard error of the difference to the first row."""
    first = next(iter(values.values()))
    rows = []
    for name, v in values.items():
        diff = v - first
        rows.append({"pages": name, "expected_streams": float(v.mean()), "of_oracle": float(v.mean() / first.mean()),
                     "minus_oracle_se": standard_error(diff) if len(v) > 1 else 0.0})
    return rows

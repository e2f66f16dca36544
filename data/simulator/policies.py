"""Page builders of the synthetic world: the logging policy, baselines and the oracle.

Every builder returns (shelves (B, S), items (B, S, L)) index arrays with -1 for empty slots.
"""

from __future__ import annotations

import numpy as np

from homegen.data.simulator.response import ITEM_DECAY, REPEAT_ARTIST, SHELF_DECAY, PageBatch, ResponseModel
from homegen.data.simulator.shelves import SEED_HISTORY, ShelfRules
from homegen.data.simulator.world import GENRES, INTENTS, MOODS, Contexts, World

_POPULARITY_ORDER = ("popular_now", "made_for_you", "new_releases", "discover", "throwback", "workout",
                     "focus")


def _gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    return -np.log(-np.log(rng.random(shape) + 1e-12) + 1e-12)


def _history_genre_share(world: World, history: np.ndarray) -> np.ndarray:
    valid = history >= 0
    genre = np.where(valid, world.catalog.genre[np.maximum(history, 0)], -1)
    counts = (genre[..., None] == np.arange(len(GENRES))).sum(axis=1)
    return counts / np.maximum(valid.sum(axis=1, keepdims=True), 1)


def compact_pages(shelves: np.ndarray, items: np.ndarray, min_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Drops shelves with fewer than `min_items` items and moves the rest to the front, in order."""
    keep = (shelves >= 0) & ((items >= 0).sum(axis=2) >= min_items)
    order = np.argsort(~keep, axis=1, kind="stable")
    shelves = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(shelves, order, 1), -1)
    items = np.take_along_axis(items, order[:, :, None], 1)
    items[shelves < 0] = -1
    return shelves, items


class SamplingPolicy:
    """A noisy heuristic: shelf types weighted by the user's history, items by popularity and genre match,
    with Gumbel noise and uniform exploration. `personalised=False, explore=1` is the random policy."""

    def __init__(self, world: World, rules: ShelfRules, *, personalised: bool = True, explore: float = 0.2,
                 noise: float = 0.7):
        self.world, self.rules = world, rules
        self.personalised, self.explore, self.noise = personalised, explore, noise
        pop = world.catalog.popularity
        self._cdf = {t: np.cumsum(pop[rules.static_pool(t)] + 0.05) for t in range(len(rules.names))
                     if rules.is_static(t)}

    def _shelf_weights(self, ctx: Contexts, history: np.ndarray, share: np.ndarray) -> np.ndarray:
        names, b = self.rules.names, len(history)
        has_history = (history >= 0).any(axis=1)
        weights = np.ones((b, len(names)))
        for name in ("because_you_listened", "recently_played"):
            weights[:, self.rules.index[name]] = np.where(has_history, 1.5 if self.personalised else 1.0, 0.0)
        if self.personalised:
            genre_cols = [self.rules.index[n] for n in names if n.startswith("genre_")]
            weights[:, genre_cols] = 6.0 * share + 0.1
            mood_cols = [self.rules.index[n] for n in names if n.startswith("mood_")]
            weights[:, mood_cols] = 0.4
            rows = np.flatnonzero(ctx.intent >= 0)
            for row in rows:
                _, mood, genre, _ = INTENTS[ctx.intent[row]]
                weights[row, mood_cols[MOODS.index(mood)]] *= 3.0
                if genre:
                    weights[row, genre_cols[GENRES.index(genre)]] *= 3.0
        return weights

    def _candidates(self, shelf: int, rows: np.ndarray, history: np.ndarray, count: int,
                    rng: np.random.Generator) -> np.ndarray:
        n = len(rows)
        name = self.rules.names[shelf]
        if self.rules.is_static(shelf):
            pool, cdf = self.rules.static_pool(shelf), self._cdf[shelf]
            if len(pool) == 0:
                return np.full((n, count), -1, np.int32)
            by_popularity = np.minimum(np.searchsorted(cdf, rng.random((n, count)) * cdf[-1]), len(pool) - 1)
            uniform = (rng.random((n, count)) * len(pool)).astype(np.int64)
            return pool[np.where(rng.random((n, count)) < self.explore, uniform, by_popularity)]
        hist = history[rows]
        length = (hist >= 0).sum(axis=1, keepdims=True)
        start = hist.shape[1] - length  # histories are right-aligned
        if name == "recently_played":
            pick = start + (rng.random((n, count)) * length).astype(np.int64)
            return np.take_along_axis(hist, np.minimum(pick, hist.shape[1] - 1), axis=1)
        recent = np.minimum(length, SEED_HISTORY)
        seed_pos = hist.shape[1] - 1 - (rng.random((n, 1)) * recent).astype(np.int64)
        seed = np.take_along_axis(hist, seed_pos, axis=1)[:, 0]
        style = self.world.catalog.style_key[np.maximum(seed, 0)]
        begin, end = self.rules.style_start[style], self.rules.style_start[style + 1]
        pick = begin[:, None] + (rng.random((n, count)) * (end - begin)[:, None]).astype(np.int64)
        return self.rules.by_style[pick]

    def build(self, users: np.ndarray, ctx: Contexts, history: np.ndarray, rng: np.random.Generator,
              num_shelves: int, min_items: int, max_items: int) -> tuple[np.ndarray, np.ndarray]:
        """Pages for a batch of requests; `history` is right-aligned (most recent last), -1 padded."""
        b, c = len(users), self.world.catalog
        share = _history_genre_share(self.world, history)
        weights = self._shelf_weights(ctx, history, share)
        score = np.log(weights + 1e-30) + _gumbel(rng, weights.shape)
        shelves = np.argsort(-score, axis=1)[:, :num_shelves].astype(np.int32)
        shelves[np.take_along_axis(weights, shelves, 1) <= 0] = -1
        count = 3 * max_items
        cands = np.full((b, num_shelves, count), -1, np.int32)
        for t in np.unique(shelves[shelves >= 0]):
            rows, cols = np.nonzero(shelves == t)
            cands[rows, cols] = self._candidates(int(t), rows, history, count, rng)
        safe = np.maximum(cands, 0)
        heuristic = np.log(c.popularity[safe] + 0.05)
        if self.personalised:
            heuristic = heuristic + 4.0 * np.take_along_axis(share, c.genre[safe].reshape(b, -1), 1).reshape(safe.shape)
        heuristic = heuristic + self.noise * _gumbel(rng, cands.shape)
        flat = np.where(cands >= 0, cands, -1).reshape(b, -1).astype(np.int64)
        key = np.where(flat >= 0, np.arange(b)[:, None] * c.num_items + flat, -1 - np.arange(flat.size).reshape(flat.shape))
        _, first = np.unique(key.ravel(), return_index=True)
        is_first = np.zeros(flat.size, bool)
        is_first[first] = True
        heuristic = np.where(is_first.reshape(cands.shape) & (cands >= 0), heuristic, -np.inf)
        order = np.argsort(-heuristic, axis=2)[:, :, :max_items]
        items = np.take_along_axis(cands, order, 2)
        ok = np.isfinite(np.take_along_axis(heuristic, order, 2))
        length = rng.integers(min_items, max_items + 1, size=(b, num_shelves, 1))
        items = np.where(ok & (np.arange(max_items) < length), items, -1)
        # Unique first occurrences can leave holes once sorted by score; keep items contiguous.
        items = np.take_along_axis(items, np.argsort(items < 0, axis=2, kind="stable"), 2)
        return compact_pages(shelves, items, min_items)


class PlackettLucePolicy(SamplingPolicy):
    """A logging policy whose every choice has a known probability, for off-policy evaluation (FORMATS.md §3
    propensities). Row by row it draws a shelf type in proportion to the same history-based weights as
    `SamplingPolicy` (among types not yet shown that still have `max_items` unused eligible items), then fills
    the row with `max_items` items drawn one by one without replacement from the type's unused eligible items,
    with probability proportional to exp(heuristic / noise): a Plackett-Luce ranking, sampled exactly with the
    Gumbel top-k trick. Every shelf is full (the page size of the models' full-shelf requests)."""

    def build_with_propensities(self, users: np.ndarray, ctx: Contexts, history: np.ndarray,
                                rng: np.random.Generator, num_shelves: int, max_items: int
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pages as (shelves (B, S), items (B, S, L), propensities (B, S, L)): each item's probability given
        everything placed before it on the page, the first item of a row including the row's shelf-type
        draw, so that the log-propensities of a page sum to the log-probability of the whole page."""
        return self._play(users, ctx, history, num_shelves, max_items, rng=rng)

    def propensities_of(self, users: np.ndarray, ctx: Contexts, history: np.ndarray, shelves: np.ndarray,
                        items: np.ndarray) -> np.ndarray:
        """(B, S, L) the probability this policy gives each decision of the given pages (as
        `build_with_propensities` reports them for its own pages; 0 for a choice it could not make): a
        target policy's side of off-policy evaluation from another policy's logs."""
        return self._play(users, ctx, history, items.shape[1], items.shape[2], pages=(shelves, items))[2]

    def _play(self, users: np.ndarray, ctx: Contexts, history: np.ndarray, num_shelves: int, max_items: int,
              rng: np.random.Generator | None = None, pages: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draws pages with `rng`, or replays `pages` (shelves, items), with each decision's probability."""
        b, c, num_types = len(users), self.world.catalog, len(self.rules.names)
        share = _history_genre_share(self.world, history)
        weights = self._shelf_weights(ctx, history, share)
        heuristic = np.log(c.popularity + 0.05)[None, :] + (4.0 * share[:, c.genre] if self.personalised else 0.0)
        logits = heuristic / self.noise  # (B, items)
        pools = [[self.rules.pool(t, history[row]) for t in range(num_types)] for row in range(b)]
        used = np.zeros((b, c.num_items), bool)
        shelves = np.full((b, num_shelves), -1, np.int32)
        items = np.full((b, num_shelves, max_items), -1, np.int32)
        props = np.zeros((b, num_shelves, max_items))
        for s in range(num_shelves):
            left = np.array([[len(pool) - used[row, pool].sum() for pool in pools[row]] for row in range(b)])
            w = np.where((left >= max_items) & ~(np.arange(num_types) == shelves[:, :s, None]).any(axis=1),
                         weights, 0.0)
            total = w.sum(axis=1)
            for row in np.flatnonzero(total > 0):
                if pages is None:
                    t = int(np.searchsorted(np.cumsum(w[row]), rng.random() * total[row], side="right"))
                    t = min(t, num_types - 1)
                    while w[row, t] <= 0:  # rounding at the top of the cumulative sum
                        t -= 1
                else:
                    t = int(pages[0][row, s])
                    if t < 0 or w[row, t] <= 0:  # no row here, or one this policy could not start
                        continue
                pool = pools[row][t][~used[row, pools[row][t]]]
                scores = logits[row, pool]
                if pages is None:
                    chosen = np.argsort(-(scores + _gumbel(rng, len(pool))))[:max_items]
                else:
                    where = {int(item): k for k, item in enumerate(pool)}
                    given = [int(i) for i in pages[1][row, s] if i >= 0]
                    if len(given) != max_items or any(i not in where for i in given):
                        continue  # a row this policy could not have filled: probability 0
                    chosen = np.array([where[i] for i in given])
                mass = np.exp(scores - scores.max())
                remaining = mass.sum() - np.concatenate([[0.0], np.cumsum(mass[chosen])[:-1]])
                shelves[row, s], items[row, s] = t, pool[chosen]
                props[row, s] = np.minimum(mass[chosen] / remaining, 1.0)  # rounding when one item is left
                props[row, s, 0] *= w[row, t] / total[row]
                used[row, pool[chosen]] = True
        return shelves, items, props


def popularity_pages(world: World, rules: ShelfRules, batch_size: int, num_shelves: int,
                     max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The same page for everyone: fixed shelf order, each filled with the most popular unused items."""
    used: set[int] = set()
    shelves = np.full(num_shelves, -1, np.int32)
    items = np.full((num_shelves, max_items), -1, np.int32)
    for s, name in enumerate(_POPULARITY_ORDER[:num_shelves]):
        shelves[s] = t = rules.index[name]
        pool = rules.static_pool(t)
        ranked = pool[np.argsort(-world.catalog.popularity[pool], kind="stable")]
        chosen = [int(i) for i in ranked[: max_items + len(used)] if int(i) not in used][:max_items]
        items[s, : len(chosen)] = chosen
        used.update(chosen)
    return np.tile(shelves, (batch_size, 1)), np.tile(items, (batch_size, 1, 1))


class OraclePolicy:
    """Greedy page construction under the true response model: shelf by shelf, it tries every shelf type,
    fills it item by item with the largest marginal gain (coherence and artist repetition included),
    keeps the best type; it then also tries the shelves reordered by value and keeps the better page."""

    def __init__(self, response: ResponseModel, candidates: int = 80):
        self.response, self.world, self.rules = response, response.world, response.rules
        self.candidates = candidates

    def build(self, users: np.ndarray, ctx: Contexts, history: np.ndarray, num_shelves: int, max_items: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """`build_one` for every request: shelves (B, S) and items (B, S, max_items), -1 padded."""
        pages = [self.build_one(int(users[k]), ctx.take(np.array([k])), history[k], num_shelves, max_items)
                 for k in range(len(users))]
        return np.stack([p[0] for p in pages]), np.stack([p[1] for p in pages])

    def build_one(self, user: int, ctx: Contexts, history: np.ndarray, num_shelves: int, max_items: int,
                  allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        c = self.world.catalog
        users = np.array([user])
        everything = np.arange(c.num_items)[None, :]
        prob = 1.0 / (1.0 + np.exp(-self.response.item_logits(users, ctx, history[None, :], everything)[0]))
        appeal = self.response.shelf_appeal(users, ctx)[0]
        types = range(len(self.rules.names)) if allowed is None else allowed
        pools = {}
        for t in types:
            pool = self.rules.pool(int(t), history)
            if len(pool) >= 1:
                pools[int(t)] = pool[np.argsort(-prob[pool])[: self.candidates]]
        used, artist_count = np.zeros(c.num_items, bool), {}
        shelves = np.full(num_shelves, -1, np.int32)
        items = np.full((num_shelves, max_items), -1, np.int32)
        values = np.zeros(num_shelves)
        for s in range(num_shelves):
            best = (0.0, -1, [])
            for t, pool in pools.items():
                if t in shelves:
                    continue
                value, chosen = self._fill(pool, prob, appeal[t] * SHELF_DECAY ** s, used, artist_count, max_items)
                if value > best[0]:
                    best = (value, t, chosen)
            if best[1] < 0:
                break
            values[s], shelves[s] = best[0], best[1]
            items[s, : len(best[2])] = best[2]
            used[best[2]] = True
            for i in best[2]:
                artist_count[c.artist[i]] = artist_count.get(c.artist[i], 0) + 1
        greedy = (shelves, items)
        order = np.argsort(-values, kind="stable")
        reordered = (shelves[order], items[order])
        pages = [greedy, reordered]
        batch = PageBatch(np.array([user, user]), ctx.take(np.array([0, 0])), np.stack([history, history]),
                          np.stack([p[0] for p in pages]), np.stack([p[1] for p in pages]))
        return pages[int(np.argmax(self.response.expected_engagement(batch)))]

    def _fill(self, pool, prob, shelf_weight, used, artist_count, max_items):
        c = self.world.catalog
        pool = pool[~used[pool]]
        genre, artist = c.genre[pool], c.artist[pool]
        base = prob[pool] * REPEAT_ARTIST ** np.array([artist_count.get(a, 0) for a in artist])
        taken = np.zeros(len(pool), bool)
        counts = np.zeros(len(GENRES))
        local_artist: dict[int, int] = {}
        weighted, chosen, value = 0.0, [], 0.0
        for j in range(min(max_items, len(pool))):
            repeat = REPEAT_ARTIST ** np.array([local_artist.get(a, 0) for a in artist]) if local_artist else 1.0
            gain_item = ITEM_DECAY ** j * base * repeat
            new_max = np.maximum(counts.max(), counts[genre] + 1)
            total = (0.75 + 0.25 * new_max / (j + 1)) * (weighted + gain_item) * shelf_weight
            total = np.where(taken, -np.inf, total)
            k = int(np.argmax(total))
            if not np.isfinite(total[k]) or total[k] <= value:
                break
            value, taken[k] = float(total[k]), True
            weighted += float(gain_item[k])
            counts[genre[k]] += 1
            local_artist[int(artist[k])] = local_artist.get(int(artist[k]), 0) + 1
            chosen.append(int(pool[k]))
        return value, chosen


def random_policy(world: World, rules: ShelfRules) -> SamplingPolicy:
    """Pages of eligible items drawn uniformly: no personalisation, all exploration, no noise."""
    return SamplingPolicy(world, rules, personalised=False, explore=1.0, noise=0.0)


def policy_engagement(response: ResponseModel, users: np.ndarray, ctx: Contexts, history: np.ndarray,
                      logged: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, num_shelves: int,
                      min_items: int, max_items: int) -> dict[str, np.ndarray]:
    """Exact expected engagement per request of the logging, popularity, random and oracle pages."""
    world, rules = response.world, response.rules
    b = len(users)

    def value(shelves, items):
        return response.expected_engagement(PageBatch(users, ctx, history, shelves, items))

    return {
        "logging policy": value(*logged),
        "popularity": value(*popularity_pages(world, rules, b, num_shelves, max_items)),
        "random": value(*random_policy(world, rules).build(users, ctx, history, rng, num_shelves, min_items,
                                                            max_items)),
        "oracle": value(*OraclePolicy(response).build(users, ctx, history, num_shelves, max_items)),
    }

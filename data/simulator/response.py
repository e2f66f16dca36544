"""The ground-truth user response model of the synthetic world.

A user looks down the page shelf by shelf (continuing with probability SHELF_DECAY) and along each shelf
item by item (ITEM_DECAY), engages with a shelf with a probability set by how much they like its type
in this context and how coherent it is, and streams an item with a probability set by their affinity for
it, lowered for each earlier item of the same artist on the page. Because every factor is known, the
expected number of streams of any page is computed exactly by `expected_engagement`; `sample_streams`
draws from the same model step by step (the Monte Carlo check of the exact value).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from homegen.data.simulator.shelves import SHELF_NAMES, ShelfRules
from homegen.data.simulator.world import GENRES, INTENTS, MOODS, Contexts, World

SHELF_DECAY = 0.85
ITEM_DECAY = 0.88
REPEAT_ARTIST = 0.6
SKIP_PENALTY = 2.0  # stream logit lost by an item the user skipped earlier in the session
NEW_DAYS = 60
_HOUR_MOOD = np.array([  # mood shift per 4-hour bucket: calm happy sad energetic romantic dark dreamy party
    [0.6, 0.0, 0.2, 0.0, 0.1, 0.3, 0.8, 0.0],
    [0.6, 0.4, 0.0, 0.2, 0.0, 0.0, 0.2, 0.0],
    [0.0, 0.6, 0.0, 0.8, 0.0, 0.0, 0.0, 0.1],
    [0.1, 0.6, 0.0, 0.3, 0.0, 0.0, 0.0, 0.3],
    [0.0, 0.2, 0.0, 0.3, 0.4, 0.1, 0.0, 0.8],
    [0.3, 0.0, 0.3, 0.0, 0.6, 0.5, 0.5, 0.3]])
_HOUR_ENERGY = np.array([-0.2, -0.05, 0.15, 0.05, 0.1, -0.1])
_DEVICE_ENERGY = np.array([0.0, -0.1, -0.05, 0.15])
_INTENT_MOOD = np.array([MOODS.index(mood) for _, mood, _, _ in INTENTS])
_INTENT_GENRE = np.array([GENRES.index(g) if g else -1 for _, _, g, _ in INTENTS])
_INTENT_ENERGY = np.array([energy for *_, energy in INTENTS])


@dataclasses.dataclass
class PageBatch:
    """Pages for a batch of requests, as item and shelf indices (-1 = empty slot)."""

    users: np.ndarray  # (B,)
    contexts: Contexts
    history: np.ndarray  # (B, H) item indices, oldest first, -1 padded
    shelves: np.ndarray  # (B, S)
    items: np.ndarray  # (B, S, L)
    skipped: np.ndarray | None = None  # (B, K) items skipped earlier in the session, -1 padded


class ResponseModel:
    """Exact expected engagement and sampled streams of pages under the world's ground truth."""

    def __init__(self, world: World, rules: ShelfRules | None = None):
        self.world = world
        self.rules = rules or ShelfRules(world)
        c = world.catalog
        self._is_new = (c.release_day >= world.config.now_day - NEW_DAYS).astype(np.float32)

    def mood_preference(self, users: np.ndarray, ctx: Contexts) -> np.ndarray:
        """(B, M) distribution over moods that the user wants in this context."""
        pref = self.world.users.mood_taste[users] + 0.3 * _HOUR_MOOD[ctx.hour // 4]
        pref[:, MOODS.index("party")] += 0.15 * (ctx.weekday >= 5)
        has_intent = ctx.intent >= 0
        pref[np.flatnonzero(has_intent), _INTENT_MOOD[ctx.intent[has_intent]]] += 1.0
        return pref / pref.sum(axis=1, keepdims=True)

    def energy_target(self, users: np.ndarray, ctx: Contexts) -> np.ndarray:
        target = self.world.users.energy[users] + _HOUR_ENERGY[ctx.hour // 4] + _DEVICE_ENERGY[ctx.device]
        target = np.where(ctx.intent >= 0, 0.3 * target + 0.7 * _INTENT_ENERGY[ctx.intent], target)
        return np.clip(target, 0.0, 1.0)

    def item_logits(self, users: np.ndarray, ctx: Contexts, history: np.ndarray,
                    items: np.ndarray, skipped: np.ndarray | None = None) -> np.ndarray:
        """(B, K) stream logits of items (B, K) (any index >= 0) for each request; an item in the request's
        `skipped` (B, K') (skipped earlier in the user's session) loses SKIP_PENALTY."""
        w, c = self.world.users, self.world.catalog
        safe = np.maximum(items, 0)
        rows = users[:, None]
        genre, second = c.genre[safe], c.second_genre[safe]
        taste = w.genre_taste[rows, genre] + 0.5 * np.where(second >= 0, w.genre_taste[rows, np.maximum(second, 0)], 0)
        mood = self.mood_preference(users, ctx)[np.arange(len(users))[:, None], c.mood[safe]]
        fav = (c.artist[safe][:, :, None] == w.favorite_artists[users][:, None, :]).any(axis=2)
        energy_gap = np.abs(c.energy[safe] - self.energy_target(users, ctx)[:, None])
        novelty = w.novelty[users][:, None]
        in_history = (items[:, :, None] == history[:, None, :]).any(axis=2) & (items >= 0)
        intent_genre = np.where(ctx.intent >= 0, _INTENT_GENRE[ctx.intent], -1)[:, None]
        logits = (-3.2 + 4.0 * taste + 3.0 * mood + 1.2 * fav - 2.5 * energy_gap + 0.8 * c.popularity[safe]
                  + 1.0 * novelty * self._is_new[safe] + in_history * (0.8 - 1.6 * novelty)
                  + 1.5 * ((genre == intent_genre) & (intent_genre >= 0)))
        if skipped is not None:
            logits = logits - SKIP_PENALTY * ((items[:, :, None] == skipped[:, None, :]) & (items[:, :, None] >= 0)).any(axis=2)
        return logits

    def shelf_appeal(self, users: np.ndarray, ctx: Contexts) -> np.ndarray:
        """(B, T) probability of engaging with each shelf type, before coherence."""
        w = self.world.users
        novelty, energy = w.novelty[users], self.energy_target(users, ctx)
        mood = self.mood_preference(users, ctx)
        genre = np.minimum(1.0, 3.0 * w.genre_taste[users])
        has_intent = ctx.intent >= 0
        genre[np.flatnonzero(has_intent & (_INTENT_GENRE[ctx.intent] >= 0)),
              _INTENT_GENRE[ctx.intent[has_intent & (_INTENT_GENRE[ctx.intent] >= 0)]]] = 1.0
        base = {"made_for_you": np.full_like(novelty, 0.9), "new_releases": 0.4 + 0.5 * novelty,
                "popular_now": np.full_like(novelty, 0.6), "discover": 0.3 + 0.6 * novelty,
                "throwback": 0.3 + 0.5 * (1 - novelty), "workout": 0.3 + 0.6 * energy,
                "focus": 0.3 + 0.6 * (1 - energy), "because_you_listened": np.full_like(novelty, 0.85),
                "recently_played": 0.3 + 0.6 * (1 - novelty)}
        columns = [base[n] for n in SHELF_NAMES[:len(base)]]
        columns += [0.3 + 0.7 * genre[:, g] for g in range(len(GENRES))]
        columns += [0.3 + 0.7 * mood[:, m] / mood.max(axis=1) for m in range(len(MOODS))]
        return np.stack(columns, axis=1)

    def components(self, batch: PageBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Factors of the stream probability of every slot: (examination (B,S,L), shelf engagement (B,S),
        item stream given both (B,S,L)); empty slots, duplicates and empty shelves have probability 0."""
        b, s, l = batch.items.shape
        c = self.world.catalog
        valid = batch.items >= 0
        flat = batch.items.reshape(b, s * l)
        flat_valid = flat >= 0
        earlier = np.tril(np.ones((s * l, s * l), bool), k=-1)
        same_item = (flat[:, :, None] == flat[:, None, :]) & earlier & flat_valid[:, None, :]
        artist = np.where(flat_valid, c.artist[np.maximum(flat, 0)], -1)
        same_artist = ((artist[:, :, None] == artist[:, None, :]) & earlier & flat_valid[:, None, :]).sum(axis=2)
        first = ~same_item.any(axis=2)
        repeat = np.where(first, REPEAT_ARTIST ** same_artist, 0.0).reshape(b, s, l)

        p = 1.0 / (1.0 + np.exp(-self.item_logits(batch.users, batch.contexts, batch.history, flat, batch.skipped)))
        item_prob = np.where(valid, p.reshape(b, s, l) * repeat, 0.0)

        genre = np.where(valid, c.genre[np.maximum(batch.items, 0)], -1)
        counts = (genre[..., None] == np.arange(len(GENRES))).sum(axis=2)
        size = valid.sum(axis=2)
        coherence = 0.75 + 0.25 * counts.max(axis=2) / np.maximum(size, 1)
        appeal = self.shelf_appeal(batch.users, batch.contexts)
        shelf_appeal = np.take_along_axis(appeal, np.maximum(batch.shelves, 0), axis=1)
        engage = np.where((batch.shelves >= 0) & (size > 0), shelf_appeal * coherence, 0.0)
        exam = SHELF_DECAY ** np.arange(s)[:, None] * ITEM_DECAY ** np.arange(l)[None, :]
        return np.broadcast_to(exam, (b, s, l)), engage, item_prob

    def slot_probabilities(self, batch: PageBatch) -> np.ndarray:
        """(B, S, L) probability that each slot is streamed."""
        exam, engage, item_prob = self.components(batch)
        return exam * engage[:, :, None] * item_prob

    def expected_engagement(self, batch: PageBatch) -> np.ndarray:
        """(B,) exact expected number of streams of each page."""
        return self.slot_probabilities(batch).sum(axis=(1, 2))

    def sample_streams(self, batch: PageBatch, rng: np.random.Generator) -> np.ndarray:
        """(B, S, L) 0/1 streams drawn step by step: scan down, scan along, engage, stream."""
        return self.sample_events(batch, rng)[0]

    def sample_events(self, batch: PageBatch, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(streams, skips), each (B, S, L) 0/1, drawn as `sample_streams` draws (the same streams from the
        same generator): a skip is an item the user reached on a shelf they engaged with and did not stream."""
        _, engage, item_prob = self.components(batch)
        b, s, l = batch.items.shape
        shelf_seen = np.cumprod(np.concatenate([np.ones((b, 1)), rng.random((b, s - 1)) < SHELF_DECAY], 1), 1)
        item_seen = np.cumprod(np.concatenate([np.ones((b, s, 1)), rng.random((b, s, l - 1)) < ITEM_DECAY], 2), 2)
        engaged = rng.random((b, s)) < engage
        streamed = rng.random((b, s, l)) < item_prob
        reached = (shelf_seen[:, :, None] * item_seen * engaged[:, :, None]).astype(bool) & (batch.items >= 0)
        return (reached & streamed).astype(np.int32), (reached & ~streamed).astype(np.int32)

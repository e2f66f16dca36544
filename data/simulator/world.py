"""The synthetic Home-page world: catalog, users and request contexts, deterministic by seed.

Everything is held as numpy arrays so that 10^6 items and users fit in memory and page batches can be
simulated vectorised. Text (titles, artist names, intents) is generated from small word lists.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterator

import numpy as np

GENRES = ("pop", "rock", "hip hop", "electronic", "jazz", "classical", "indie", "r&b", "country",
          "metal", "folk", "latin")
MOODS = ("calm", "happy", "sad", "energetic", "romantic", "dark", "dreamy", "party")
DEVICES = ("mobile", "desktop", "tv", "car")
COUNTRIES = ("SE", "US", "GB", "DE", "BR", "JP")
# Intent templates: (text, mood, genre or None, target energy).
INTENTS = (
    ("calm music for studying", "calm", None, 0.2),
    ("something to focus on deep work", "calm", "classical", 0.25),
    ("workout energy", "energetic", None, 0.95),
    ("party time with friends", "party", None, 0.85),
    ("sad songs for a rainy day", "sad", None, 0.3),
    ("jazz for dinner", "romantic", "jazz", 0.35),
    ("dreamy music to fall asleep", "dreamy", None, 0.1),
    ("happy morning commute", "happy", None, 0.6),
    ("heavy and dark", "dark", "metal", 0.9),
    ("road trip sing along", "happy", "country", 0.65),
    ("late night electronic", "dreamy", "electronic", 0.55),
    ("latin dance hits", "party", "latin", 0.85),
)
_INTENT_PREFIXES = ("", "play ", "i want ", "some ", "give me ")
_SYLLABLES = ("la", "mo", "ri", "sa", "ven", "tor", "ka", "lu", "ne", "sol", "mi", "da", "zen", "ko",
              "ra", "bel", "fi", "no", "ta", "ver", "go", "lin", "ma", "shi", "el", "do", "ny", "qua")
_TITLE_WORDS = ("golden", "hour", "night", "river", "fire", "echo", "blue", "heart", "summer", "rain",
                "city", "lights", "dream", "wild", "silver", "ocean", "midnight", "storm", "sky",
                "dance", "shadow", "love", "road", "home", "stars", "paper", "glass", "neon")
EPOCH = datetime.date(2016, 1, 1)
HOUR_BUCKETS = 6  # 4-hour buckets drive the ground-truth mood shift


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes and page shape of a synthetic world."""

    num_items: int = 10_000
    num_users: int = 2_000
    seed: int = 0
    now_day: int = 3650  # days since EPOCH at the end of the logs
    new_release_days: int = 30
    history_len: int = 30
    num_shelves: int = 6
    min_items: int = 4
    max_items: int = 10

    def __post_init__(self):
        if self.num_items < 4 * self.max_items:
            raise ValueError(f"num_items={self.num_items} is too small: need at least {4 * self.max_items}")
        if self.num_users < 1:
            raise ValueError("num_users must be >= 1")
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError(f"need 1 <= min_items <= max_items, got {self.min_items}, {self.max_items}")


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of a (n, k) probability matrix."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=1), probs.shape[1] - 1)


class Catalog:
    """Tracks with artist, genres, mood, energy, release day and heavy-tailed popularity."""

    def __init__(self, config: WorldConfig, rng: np.random.Generator):
        n, num_g, num_m = config.num_items, len(GENRES), len(MOODS)
        self.num_items = n
        self.num_artists = a = max(8, n // 12)
        genre_weight = 1.0 / np.arange(1, num_g + 1) ** 0.5
        self.artist_genre = rng.choice(num_g, size=a, p=genre_weight / genre_weight.sum())
        self.artist_style = rng.integers(0, 4, size=a)  # similar artists share (genre, style)
        artist_weight = 1.0 / (np.arange(a) + 10.0) ** 0.8
        self.artist = rng.choice(a, size=n, p=artist_weight / artist_weight.sum()).astype(np.int32)
        self.genre = self.artist_genre[self.artist].astype(np.int32)
        has_second = rng.random(n) < 0.3
        self.second_genre = np.where(has_second, rng.integers(0, num_g, size=n), -1).astype(np.int32)
        genre_mood = rng.dirichlet(np.full(num_m, 0.6), size=num_g)
        self.mood = _categorical(rng, genre_mood[self.genre]).astype(np.int32)
        mood_energy = np.array([0.2, 0.6, 0.3, 0.9, 0.4, 0.7, 0.25, 0.85])
        self.energy = np.clip(mood_energy[self.mood] + rng.normal(0, 0.12, n), 0, 1).astype(np.float32)
        recent = rng.random(n) < 0.08
        age = np.where(recent, rng.integers(0, 60, size=n), 60 + rng.exponential(1500, size=n))
        self.release_day = (config.now_day - np.minimum(age, config.now_day)).astype(np.int32)
        fame = rng.pareto(1.2, size=n) * (1.0 + 3.0 * artist_weight[self.artist] / artist_weight[0])
        self.popularity = (np.log1p(fame) / np.log1p(fame).max()).astype(np.float32)
        self.style_key = (self.genre * 4 + self.artist_style[self.artist]).astype(np.int32)
        self._title_words = rng.integers(0, len(_TITLE_WORDS), size=(n, 3))
        self._title_len = rng.integers(1, 4, size=n)
        self._artist_syllables = rng.integers(0, len(_SYLLABLES), size=(a, 5))

    def item_id(self, index: int) -> str:
        return f"t{index}"

    def title(self, index: int) -> str:
        words = [_TITLE_WORDS[w] for w in self._title_words[index, : self._title_len[index]]]
        return " ".join(words).title()

    def artist_name(self, artist: int) -> str:
        s = [_SYLLABLES[k] for k in self._artist_syllables[artist]]
        return f"{''.join(s[:2]).title()} {''.join(s[2:]).title()}"

    def genres_of(self, index: int) -> list[str]:
        names = [GENRES[self.genre[index]]]
        if self.second_genre[index] >= 0 and self.second_genre[index] != self.genre[index]:
            names.append(GENRES[self.second_genre[index]])
        return names

    def record(self, index: int) -> dict:
        """The catalog line of FORMATS.md §2 for one item."""
        return next(self.records(index, index + 1))

    def records(self, start: int, stop: int) -> Iterator[dict]:
        """The catalog lines of items start..stop-1, with names, titles and dates computed once per distinct
        value (what makes writing a 7 x 10^7-item catalog take minutes, not hours)."""
        artist_names: dict[int, str] = {}
        titles: dict[tuple, str] = {}
        dates: dict[int, str] = {}
        for i in range(start, stop):
            artist, day = int(self.artist[i]), int(self.release_day[i])
            words = tuple(self._title_words[i, : self._title_len[i]].tolist())
            if artist not in artist_names:
                artist_names[artist] = self.artist_name(artist)
            if words not in titles:
                titles[words] = " ".join(_TITLE_WORDS[w] for w in words).title()
            if day not in dates:
                dates[day] = (EPOCH + datetime.timedelta(days=day)).isoformat()
            yield {"item_id": self.item_id(i), "title": titles[words], "artist": artist_names[artist],
                   "genres": self.genres_of(i), "mood": MOODS[self.mood[i]],
                   "energy": round(float(self.energy[i]), 3), "release_date": dates[day],
                   "popularity": round(float(self.popularity[i]), 4)}


class Users:
    """Users: genre and mood tastes, favourite artists, novelty appetite, context habits."""

    def __init__(self, config: WorldConfig, catalog: Catalog, rng: np.random.Generator):
        u = config.num_users
        self.num_users = u
        self.genre_taste = rng.dirichlet(np.full(len(GENRES), 0.3), size=u).astype(np.float32)
        self.mood_taste = rng.dirichlet(np.full(len(MOODS), 0.5), size=u).astype(np.float32)
        self.novelty = rng.beta(2, 2, size=u).astype(np.float32)
        self.energy = rng.uniform(0.2, 0.8, size=u).astype(np.float32)
        self.device_habit = rng.dirichlet(np.full(len(DEVICES), 0.7), size=u)
        self.peak_hour = rng.integers(0, 24, size=u)
        self.country = rng.integers(0, len(COUNTRIES), size=u).astype(np.int32)
        self.activity = rng.pareto(1.5, size=u) + 0.2
        # Favourite artists: drawn within genres the user likes.
        order = np.argsort(catalog.artist_genre, kind="stable")
        starts = np.searchsorted(catalog.artist_genre[order], np.arange(len(GENRES) + 1))
        fav = np.empty((u, 3), np.int32)
        for k in range(3):
            g = _categorical(rng, self.genre_taste)
            count = np.maximum(starts[g + 1] - starts[g], 1)
            pick = starts[g] + (rng.random(u) * count).astype(np.int64)
            fav[:, k] = order[np.minimum(pick, len(order) - 1)]
        self.favorite_artists = fav


@dataclasses.dataclass
class Contexts:
    """A batch of request contexts (one row per page)."""

    hour: np.ndarray
    weekday: np.ndarray
    device: np.ndarray
    country: np.ndarray
    intent: np.ndarray  # index into INTENTS, -1 for none
    intent_prefix: np.ndarray

    def record(self, row: int) -> dict:
        """The `context` object of FORMATS.md §3 for one row."""
        ctx = {"hour": int(self.hour[row]), "weekday": int(self.weekday[row]),
               "device": DEVICES[self.device[row]], "country": COUNTRIES[self.country[row]]}
        if self.intent[row] >= 0:
            ctx["intent"] = _INTENT_PREFIXES[self.intent_prefix[row]] + INTENTS[self.intent[row]][0]
        return ctx

    def take(self, rows: np.ndarray) -> Contexts:
        return Contexts(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


def parse_context(users: Users, user: int, context: dict) -> Contexts:
    """A one-row Contexts from a FORMATS.md context object (unknown values fall back to the user's)."""
    def index(values, value, default):
        return values.index(value) if value in values else default
    intent, prefix = -1, 0
    text = str(context.get("intent", "")).strip().lower()
    for k, (template, *_rest) in enumerate(INTENTS):
        if text and text.endswith(template):
            intent = k
            prefix = index(_INTENT_PREFIXES, text[: len(text) - len(template)], 0)
    return Contexts(hour=np.array([int(context.get("hour", users.peak_hour[user])) % 24]),
                    weekday=np.array([int(context.get("weekday", 0)) % 7]),
                    device=np.array([index(DEVICES, context.get("device"), 0)]),
                    country=np.array([index(COUNTRIES, context.get("country"), users.country[user])]),
                    intent=np.array([intent]), intent_prefix=np.array([prefix]))


def sample_contexts(users: Users, user_rows: np.ndarray, day: np.ndarray,
                    rng: np.random.Generator, intent_rate: float = 0.15) -> Contexts:
    """Contexts for a batch of requests: hour near the user's peak, their device habit, some intents."""
    b = len(user_rows)
    hour = (users.peak_hour[user_rows] + np.round(rng.normal(0, 3, b)).astype(int)) % 24
    return Contexts(hour=hour, weekday=(day + 4) % 7,  # EPOCH was a Friday
                    device=_categorical(rng, users.device_habit[user_rows]),
                    country=users.country[user_rows],
                    intent=np.where(rng.random(b) < intent_rate, rng.integers(0, len(INTENTS), b), -1),
                    intent_prefix=rng.integers(0, len(_INTENT_PREFIXES), b))


class World:
    """Catalog + users of one seed; the ground truth the response model and policies read."""

    def __init__(self, config: WorldConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.catalog = Catalog(config, rng)
        self.users = Users(config, self.catalog, rng)

    def user_id(self, index: int) -> str:
        return f"u{index}"

    def user_index(self, user_id: str) -> int:
        """Index of a user id of this world; ValueError for unknown ids."""
        if user_id.startswith("u") and user_id[1:].isdigit() and int(user_id[1:]) < self.users.num_users:
            return int(user_id[1:])
        raise ValueError(f"unknown user {user_id!r}")

    def lookup_item(self, item_id: str) -> int:
        """Index of an item id of this world, -1 for any other id."""
        if item_id.startswith("t") and item_id[1:].isdigit() and int(item_id[1:]) < self.catalog.num_items:
            return int(item_id[1:])
        return -1

    def item_index(self, item_id: str) -> int:
        """Index of an item id of this world; ValueError for unknown ids."""
        index = self.lookup_item(item_id)
        if index < 0:
            raise ValueError(f"unknown item {item_id!r}")
        return index

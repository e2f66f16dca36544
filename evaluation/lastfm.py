"""Judging pages on Last.fm by what users tagged after the cut-off (data/lastfm.py), and the baselines.

A page is judged against the user's held-out (theme, artist) assignments:
- `pair_ndcg` (the headline): a slot at shelf row r and column c (from 0) whose (shelf, artist) pair the user
  went on to assign earns 1 / (log2(r + 2) * log2(c + 2)): the DCG discount along both axes of a page, read
  top to bottom and left to right along each shelf, as in the two-dimensional nDCG of carousel interfaces
  (Felicioni et al., "A methodology for the offline evaluation of recommender systems in a user interface with
  multiple carousels", UMAP 2021). It is divided by an ideal that places the user's largest held-out themes
  on the top rows, each with as many of its artists as a shelf holds; the ideal ignores that an artist may
  appear once per page, so it is an upper bound and the ratio lies in [0, 1].
- `artist_recall`: the held-out artists anywhere on the page, over min(held-out artists, page slots).
- `theme_coverage`: the held-out themes that are shelves of the page, over min(held-out themes, shelves).

Every baseline obeys the page rules homegen's decoder does on this data: a shelf holds only artists that
were tagged with its theme before the cut-off (the pairs in the training logs), and no artist appears twice.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
from scipy import sparse

METRICS = ("pair_ndcg", "artist_recall", "theme_coverage")


def discount(row: int, column: int) -> float:
    return 1.0 / (math.log2(row + 2) * math.log2(column + 2))


def ideal_dcg(pairs: list[tuple[str, str]], num_shelves: int, items_per_shelf: int) -> float:
    """The upper bound of a page's pair DCG for these held-out pairs (see the module docstring)."""
    sizes = sorted(collections.Counter(shelf for shelf, _ in pairs).values(), reverse=True)[:num_shelves]
    return sum(discount(r, c) for r, n in enumerate(sizes) for c in range(min(n, items_per_shelf)))


def judge(page: list[dict], pairs: list[tuple[str, str]], num_shelves: int, items_per_shelf: int) -> dict[str, float]:
    """The metrics of one page against one user's held-out (shelf, artist) pairs."""
    wanted = set(map(tuple, pairs))
    artists, themes = {a for _, a in wanted}, {s for s, _ in wanted}
    dcg = sum(discount(r, c) for r, shelf in enumerate(page) for c, item in enumerate(shelf["items"])
              if (shelf["shelf"], item) in wanted)
    shown = {item for shelf in page for item in shelf["items"]}
    shelves = {shelf["shelf"] for shelf in page}
    return {"pair_ndcg": dcg / ideal_dcg(pairs, num_shelves, items_per_shelf),
            "artist_recall": len(shown & artists) / min(len(artists), num_shelves * items_per_shelf),
            "theme_coverage": len(shelves & themes) / min(len(themes), num_shelves)}


def intent_theme(pairs: list[tuple[str, str]], themes: list[str]) -> str:
    """The theme a user assigned most after the cut-off (ties: the more used theme): the intent they are asked
    with when intents are measured."""
    counts = collections.Counter(shelf for shelf, _ in pairs)
    return min(counts, key=lambda shelf: (-counts[shelf], themes.index(shelf)))


def judge_intent(page: list[dict], pairs: list[tuple[str, str]], theme: str, items_per_shelf: int) -> dict[str, float]:
    """How a page answers an intent for `theme`: whether a shelf of that theme is on it, whether it is the first
    shelf, and the share of the user's held-out artists of that theme (at most a shelf's worth) on it."""
    wanted = {artist for shelf, artist in pairs if shelf == theme}
    shelf = next((s for s in page if s["shelf"] == theme), None)
    found = len(wanted & set(shelf["items"])) if shelf else 0
    return {"theme_shown": float(shelf is not None), "theme_first": float(bool(page) and page[0]["shelf"] == theme),
            "theme_recall": found / min(len(wanted), items_per_shelf)}


INTENT_METRICS = ("theme_shown", "theme_first", "theme_recall")


def judge_intents(pages: list[list[dict]], heldout: list[dict], requests: list[dict], themes: list[str]
                  ) -> dict[str, np.ndarray]:
    """Per-request `judge_intent` arrays for the intent theme of each request's user."""
    return _columns([judge_intent(page, h["pairs"], theme, r["max_items_per_shelf"])
                     for page, h, r, theme in zip(pages, heldout, requests, themes, strict=True)], INTENT_METRICS)


def judge_all(pages: list[list[dict]], heldout: list[dict], requests: list[dict]) -> dict[str, np.ndarray]:
    """Per-request metric arrays for pages in the order of `requests` (and of `heldout`)."""
    return _columns([judge(page, h["pairs"], r["num_shelves"], r["max_items_per_shelf"])
                     for page, h, r in zip(pages, heldout, requests, strict=True)], METRICS)


def _columns(rows: list[dict[str, float]], metrics: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-request metric dicts as one array per metric."""
    return {m: np.array([row[m] for row in rows]) for m in metrics}


@dataclasses.dataclass
class LogStatistics:
    """What the training page logs say: how often each (shelf, artist) pair was placed (which is also which
    pairs are eligible), and which artists each user placed (for item-to-item co-occurrence)."""

    shelves: list[str]
    items: list[str]
    pair_counts: np.ndarray  # (shelves, items)
    cooccurrence: sparse.csr_matrix  # (items, items), cosine-normalised, zero diagonal

    @classmethod
    def from_pages(cls, pages: list[dict]) -> LogStatistics:
        shelves = sorted({s["shelf"] for p in pages for s in p["page"]})
        items = sorted({i for p in pages for s in p["page"] for i in s["items"]} |
                       {i for p in pages for i in p.get("history", [])})
        shelf_index, item_index = {s: k for k, s in enumerate(shelves)}, {i: k for k, i in enumerate(items)}
        counts = np.zeros((len(shelves), len(items)))
        users: dict[str, set[int]] = collections.defaultdict(set)
        for p in pages:
            for s in p["page"]:
                for item in s["items"]:
                    counts[shelf_index[s["shelf"]], item_index[item]] += 1
                    users[p["user_id"]].add(item_index[item])
        rows = [u for u, members in enumerate(users.values()) for _ in members]
        cols = [i for members in users.values() for i in members]
        x = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(users), len(items)))
        co = (x.T @ x).tocsr().astype(np.float64)
        norm = np.sqrt(np.maximum(co.diagonal(), 1.0))
        co = sparse.diags(1 / norm) @ co @ sparse.diags(1 / norm)
        co.setdiag(0)
        co.eliminate_zeros()
        return cls(shelves, items, counts, co.tocsr())

    @property
    def item_index(self) -> dict[str, int]:
        return {i: k for k, i in enumerate(self.items)}


def fill_page(stats: LogStatistics, shelf_order: np.ndarray, item_scores: np.ndarray, num_shelves: int,
              items_per_shelf: int) -> list[dict]:
    """A page from per-shelf item scores (shelves, items): the first `num_shelves` shelves of `shelf_order`
    (indices), each filled with its best-scored eligible artists not already on the page."""
    used: set[int] = set()
    page = []
    for s in shelf_order[:num_shelves]:
        scores = np.where(stats.pair_counts[s] > 0, item_scores[s], -np.inf)
        chosen = []
        for i in np.argsort(-scores, kind="stable"):
            if not np.isfinite(scores[i]) or len(chosen) == items_per_shelf:
                break
            if i not in used:
                chosen.append(int(i))
        used.update(chosen)
        page.append({"shelf": stats.shelves[s], "items": [stats.items[i] for i in chosen]})
    return page


@dataclasses.dataclass(frozen=True)
class ThemeThenArtist:
    """Themes ranked by the user's history (each history artist votes for the themes it was placed under,
    in proportion) plus `theme_prior` x each theme's share of all placements; then each theme's artists by
    `popularity` x log(1 + placements under the theme) + `neighbours` x co-occurrence with the history
    (cosine over users) + `own` x [the artist is in the history] (x 1 to 2, rising along the history).
    `POPULAR` and `USER_TOP_ARTISTS` below are the baselines without personal themes."""

    theme_prior: float = 1.0
    popularity: float = 1.0
    neighbours: float = 0.0
    own: float = 0.0
    personal_themes: bool = True

    def pages(self, stats: LogStatistics, requests: list[dict], first_themes: list[str] | None = None
              ) -> list[list[dict]]:
        """One page per request; with `first_themes`, request k's page opens with that theme (its intent)."""
        index = stats.item_index
        log_counts = np.log1p(stats.pair_counts)
        share = stats.pair_counts.sum(1) / stats.pair_counts.sum()
        per_item = stats.pair_counts / np.maximum(stats.pair_counts.sum(0, keepdims=True), 1)
        pages = []
        for k, r in enumerate(requests):
            history = np.array([index[i] for i in r.get("history", []) if i in index], np.int64)
            theme_score = self.theme_prior * share
            if self.personal_themes and len(history):
                theme_score = theme_score + per_item[:, history].sum(1) / len(history)
            item_score = self.popularity * log_counts
            if self.neighbours and len(history):
                item_score = item_score + self.neighbours * np.asarray(stats.cooccurrence[history].sum(0)).ravel()
            if self.own and len(history):  # a later history artist (more played, more recent) ranks higher
                item_score = item_score.copy()
                item_score[:, history] += self.own * (1 + np.arange(len(history)) / len(history))
            order = np.argsort(-theme_score, kind="stable")
            if first_themes is not None:
                first = stats.shelves.index(first_themes[k])
                order = np.concatenate([[first], order[order != first]])
            pages.append(fill_page(stats, order, item_score, r["num_shelves"], r["max_items_per_shelf"]))
        return pages


POPULAR = ThemeThenArtist(theme_prior=1.0, popularity=1.0, personal_themes=False)
USER_TOP_ARTISTS = ThemeThenArtist(theme_prior=1.0, popularity=1.0, own=100.0, personal_themes=False)

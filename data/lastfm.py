"""Last.fm listening and tagging (HetRec 2011) as homegen page data: artists are items, the most used tags are
shelf themes, and what users tagged after a cut-off month is what their pages are judged by.

The files (tab-separated, one header row): `user_artists.dat` (userID, artistID, weight = play count, undated),
`user_taggedartists.dat` (userID, artistID, tagID, day, month, year: who tagged which artist with which tag,
dated to the month), `tags.dat` (tagID, tagValue; ISO-8859-1) and `artists.dat` (id, name, url, pictureURL;
UTF-8). A malformed line (missing column, non-integer id, impossible date, text not in the file's encoding) is
a DataFormatError naming the file and line.

`build` turns them into FORMATS.md shapes:
- training page logs: one page per user and month before the cut-off, a shelf per theme the user tagged
  artists with that month (largest first), its items those artists (most played first); the history is the
  user's most played artists, then the artists they tagged before that month (most recent last);
- requests at the cut-off for the users who tagged theme artists after it, split by a seeded shuffle into
  disjoint validation and test users, with what each tagged after the cut-off held out beside them;
- a catalog: each artist's name and its most used themes before the cut-off.
Nothing after the cut-off reaches the training logs, the catalog or a request.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
from collections.abc import Iterator

import numpy as np

from homegen.data.formats import DataFormatError, text_lines

FILES = {  # file: (columns, encoding)
    "user_artists.dat": (("userID", "artistID", "weight"), "utf-8"),
    "user_taggedartists.dat": (("userID", "artistID", "tagID", "day", "month", "year"), "utf-8"),
    "tags.dat": (("tagID", "tagValue"), "iso-8859-1"),
    "artists.dat": (("id", "name", "url", "pictureURL"), "utf-8"),
}


def read_table(path: str, columns: tuple[str, ...], encoding: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each data row of a tab-separated file with a header row; DataFormatError
    for a row with fewer fields than `columns` or text that is not in `encoding`."""
    for number, line in text_lines(path, encoding):
        if number == 1:
            continue
        fields = line.split("\t")
        if len(fields) < len(columns):
            raise DataFormatError(path, number, f"expected {len(columns)} tab-separated columns "
                                                f"({', '.join(columns)}), got {len(fields)}")
        yield number, fields


def _integer(text: str, path: str, line: int, column: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataFormatError(path, line, f"{column} must be an integer, got {text!r}") from None


@dataclasses.dataclass
class Assignment:
    """A user tagged an artist with a tag in a month (year * 12 + month - 1)."""

    user: str
    artist: str
    tag: str
    month: int


@dataclasses.dataclass
class LastfmData:
    plays: dict[str, dict[str, int]]  # user -> artist -> play count
    assignments: list[Assignment]  # in file order
    tag_names: dict[str, str]  # tag id -> text
    artist_names: dict[str, str]  # artist id -> name


def month_index(year: int, month: int) -> int:
    return year * 12 + month - 1


def parse_month(text: str) -> int:
    """'YYYY-MM' -> month index; ValueError otherwise."""
    try:
        stamp = datetime.datetime.strptime(text, "%Y-%m")
    except ValueError:
        raise ValueError(f"a month is YYYY-MM, got {text!r}") from None
    return month_index(stamp.year, stamp.month)


def month_text(index: int) -> str:
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def read_lastfm(folder: str) -> LastfmData:
    """The four files of a HetRec 2011 Last.fm folder, checked line by line."""
    path = lambda name: f"{folder}/{name}"  # noqa: E731
    plays: dict[str, dict[str, int]] = collections.defaultdict(dict)
    name = "user_artists.dat"
    for line, (user, artist, weight, *_) in read_table(path(name), *FILES[name]):
        count = _integer(weight, path(name), line, "weight")
        if count < 0:
            raise DataFormatError(path(name), line, f"weight must be >= 0, got {count}")
        plays[str(_integer(user, path(name), line, "userID"))][str(_integer(artist, path(name), line, "artistID"))] = count
    assignments = []
    name = "user_taggedartists.dat"
    for line, fields in read_table(path(name), *FILES[name]):
        user, artist, tag, day, month, year = (_integer(v, path(name), line, c) for v, c in zip(fields, FILES[name][0]))
        try:
            datetime.date(year, month, day)
        except ValueError as e:
            raise DataFormatError(path(name), line, f"bad date {year}-{month}-{day} ({e})") from None
        assignments.append(Assignment(str(user), str(artist), str(tag), month_index(year, month)))
    name = "tags.dat"
    tag_names = {str(_integer(tag, path(name), line, "tagID")): text.strip()
                 for line, (tag, text, *_) in read_table(path(name), *FILES[name])}
    name = "artists.dat"
    artist_names = {str(_integer(artist, path(name), line, "id")): text.strip()
                    for line, (artist, text, *_) in read_table(path(name), *FILES[name])}
    return LastfmData(dict(plays), assignments, tag_names, artist_names)


def item_id(artist: str) -> str:
    return f"a{artist}"


def user_id(user: str) -> str:
    return f"u{user}"


def shelf_name(text: str) -> str:
    """A tag's text as a shelf type name: lower case, words joined by '_' ('female vocalists' ->
    'female_vocalists')."""
    return "_".join(text.lower().split())


def intent_text(tag_text: str) -> str:
    """A tag as a request's free-text intent."""
    return f"something {tag_text.lower()}"


@dataclasses.dataclass
class LastfmPages:
    catalog: list[dict]
    pages: list[dict]  # training page logs (FORMATS.md §3)
    requests: dict[str, list[dict]]  # split -> requests (FORMATS.md §4)
    heldout: dict[str, list[dict]]  # split -> per request: what its user tagged after the cut-off
    summary: dict


def build(data: LastfmData, cutoff: int, themes: int = 20, num_shelves: int = 5, items_per_shelf: int = 10,
          max_history: int = 30, top_played: int = 20, validation_share: float = 0.5, seed: int = 0,
          max_page_shelves: int = 10, max_page_items: int = 20, page_months: int = 1,
          page_stride: int | None = None, intent_share: float = 0.0) -> LastfmPages:
    """Page logs, catalog, requests and held-out assignments (see the module docstring). `themes`: the most
    used tags before `cutoff` (a month index) become shelves; requests ask for `num_shelves` shelves of
    exactly `items_per_shelf` artists; a training page gathers `page_months` months of a user's assignments
    (windows end every `page_stride` months, default `page_months`, counted from the cut-off backwards, so no
    window straddles it; a stride below the window's length makes overlapping windows: more pages of the
    requests' shape, an assignment in several of them) and holds at most `max_page_shelves` shelves of at most
    `max_page_items` artists (a window with more fills several pages). A seeded `intent_share` of the
    training pages carry their first (largest) theme as a free-text intent, "something <tag>": a tag is a real
    theme and a real intent."""
    if page_months < 1:
        raise ValueError(f"page_months must be >= 1, got {page_months}")
    stride = page_months if page_stride is None else page_stride
    if not 1 <= stride <= page_months:
        raise ValueError(f"page_stride must be between 1 and page_months ({page_months}), got {page_stride}")
    before = [a for a in data.assignments if a.month < cutoff]
    after = [a for a in data.assignments if a.month >= cutoff]
    tag_use = collections.Counter(a.tag for a in before)
    theme_tags = [tag for tag, _ in sorted(tag_use.items(), key=lambda kv: (-kv[1], int(kv[0])))[:themes]]
    texts = {tag: data.tag_names.get(tag, f"tag {tag}") for tag in theme_tags}
    names = {tag: shelf_name(text) for tag, text in texts.items()}
    if len(set(names.values())) != len(names):
        raise ValueError(f"two theme tags share a shelf name: {sorted(names.values())}")
    plays = data.plays

    def played(user: str) -> list[str]:  # most played first
        return sorted(plays.get(user, {}), key=lambda a: (-plays[user][a], int(a)))

    tagged_before: dict[str, list[Assignment]] = collections.defaultdict(list)
    for a in sorted(before, key=lambda a: a.month):
        tagged_before[a.user].append(a)

    def history(user: str, month: int) -> list[str]:
        """The user's most played artists (least played of them first), then the artists they tagged
        before `month`, most recent last; each artist once, at its latest place; the last `max_history`."""
        recent = [a.artist for a in tagged_before.get(user, []) if a.month < month]
        order = list(reversed(played(user)[:top_played])) + recent
        last = {artist: k for k, artist in enumerate(order)}
        return [item_id(a) for k, a in enumerate(order) if last[a] == k][-max_history:]

    def windows(month: int) -> range:
        """The first months of the windows holding `month`: [cutoff - stride * j - page_months, cutoff - stride * j)
        for every j >= 0 that contains it."""
        last, first = (cutoff - month - 1) // stride, max(0, -(-(cutoff - page_months - month) // stride))
        return range(cutoff - stride * last - page_months, cutoff - stride * first - page_months + 1, stride)

    # Training pages: a user's theme assignments of a window of months, a shelf per theme.
    pages = []
    intent_rng = np.random.default_rng(seed + 1)
    by_user_window: dict[tuple[str, int], dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for a in before:
        for start in windows(a.month) if a.tag in names else ():
            shelf = by_user_window[a.user, start][a.tag]
            if a.artist not in shelf:
                shelf.append(a.artist)
    for (user, month), shelves in sorted(by_user_window.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        rank = {a: k for k, a in enumerate(played(user))}
        ordered = sorted(shelves.items(), key=lambda kv: (-len(kv[1]), theme_tags.index(kv[0])))
        rows = [(tag, chunk) for tag, artists in ordered
                for artists in [sorted(artists, key=lambda a: (rank.get(a, len(rank)), int(a)))]
                for chunk in (artists[i:i + max_page_items] for i in range(0, len(artists), max_page_items))]
        for k in range(0, len(rows), max_page_shelves):
            stamp = datetime.datetime(month // 12, month % 12 + 1, 1, tzinfo=datetime.timezone.utc)
            intent = intent_rng.random() < intent_share
            pages.append({"request_id": f"lastfm-{user}-{month_text(month)}-{k // max_page_shelves}",
                          "user_id": user_id(user), "timestamp": int(stamp.timestamp()),
                          **({"context": {"intent": intent_text(texts[rows[k][0]])}} if intent else {}),
                          "history": history(user, month),
                          "page": [{"shelf": names[tag], "items": [item_id(a) for a in artists],
                                    "streams": [1] * len(artists)} for tag, artists in rows[k:k + max_page_shelves]]})

    # Catalog: every artist that was played or tagged before the cut-off, with its most used themes then.
    artist_themes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for a in before:
        if a.tag in names:
            artist_themes[a.artist][names[a.tag]] += 1
    artists = {a for user in plays.values() for a in user} | {a.artist for a in before}
    catalog = [{"item_id": item_id(a), **({"title": data.artist_names[a]} if a in data.artist_names else {}),
                "genres": [t for t, _ in artist_themes[a].most_common(5)]} for a in sorted(artists, key=int)]

    # Held out: theme assignments after the cut-off of artists in the catalog, per user.
    heldout_pairs: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for a in after:
        pair = (names.get(a.tag), item_id(a.artist))
        if a.tag in names and a.artist in artists and pair not in heldout_pairs[a.user]:
            heldout_pairs[a.user].append(pair)
    users = sorted(heldout_pairs, key=int)
    order = np.random.default_rng(seed).permutation(len(users))
    cut = int(round(validation_share * len(users)))
    splits = {"validation": sorted((users[k] for k in order[:cut]), key=int),
              "test": sorted((users[k] for k in order[cut:]), key=int)}
    requests, heldout = {}, {}
    for split, members in splits.items():
        requests[split] = [{"request_id": f"lastfm-{user}", "user_id": user_id(user), "history": history(user, cutoff),
                            "num_shelves": num_shelves, "min_items_per_shelf": items_per_shelf,
                            "max_items_per_shelf": items_per_shelf, "beam_size": 4} for user in members]
        heldout[split] = [{"request_id": f"lastfm-{user}", "user_id": user_id(user),
                           "pairs": [list(p) for p in heldout_pairs[user]]} for user in members]
    summary = {"cutoff": month_text(cutoff), "themes": [names[t] for t in theme_tags],
               "theme_intents": {names[t]: intent_text(texts[t]) for t in theme_tags},
               "pages_with_intent": sum("context" in p for p in pages),
               "assignments_before": len(before), "assignments_after": len(after), "pages": len(pages),
               "catalog_items": len(catalog), **{f"{s}_users": len(m) for s, m in splits.items()},
               "heldout_pairs": sum(len(p) for p in heldout_pairs.values())}
    return LastfmPages(catalog, pages, requests, heldout, summary)

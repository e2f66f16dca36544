"""Readers for the data contract of FORMATS.md.

Every reader reports a malformed record as a DataFormatError naming the file, the line and the reason.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
from collections.abc import Container, Iterator

INTERACTION_FORMATS = ("auto", "sequences", "pairs", "csv", "movielens")


class DataFormatError(ValueError):
    """A malformed record: `path:line: reason`."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


@dataclasses.dataclass
class UserSequence:
    """One user's interactions in time order."""

    user_id: str
    items: list[str]
    timestamps: list[float] | None = None


@dataclasses.dataclass
class Shelf:
    shelf: str
    items: list[str]
    streams: list[float] | None = None
    propensities: list[float] | None = None  # the logging policy's, per item (FORMATS.md §3)


@dataclasses.dataclass
class PageLog:
    """One served Home page (FORMATS.md §3)."""

    user_id: str
    page: list[Shelf]
    request_id: str | None = None
    timestamp: float | None = None
    context: dict[str, str] = dataclasses.field(default_factory=dict)
    intent: str | None = None
    history: list[str] = dataclasses.field(default_factory=list)
    log_propensity: float | None = None  # log probability of the whole page under the logging policy


@dataclasses.dataclass
class CatalogItem:
    item_id: str
    title: str | None = None
    artist: str | None = None
    genres: list[str] = dataclasses.field(default_factory=list)
    release_date: str | None = None
    popularity: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def display(self) -> dict:
        """The fields a page shows beside the item id."""
        return {"title": self.title, "artist": self.artist, "genres": self.genres}

    def text(self) -> str:
        """The item's words for the sentencepiece model."""
        return " ".join(t for t in [self.title, self.artist, *self.genres] if t)


def _id(value, path: str, line: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise DataFormatError(path, line, f"{what} must be a non-empty string or integer, got {value!r}")
    return str(value)


def parse_timestamp(text: str) -> float:
    """Unix seconds or ISO 8601 (a trailing Z is UTC)."""
    try:
        value = float(text)
    except ValueError:
        stamp = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=datetime.timezone.utc)
        return stamp.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"timestamp {text!r} is not finite")
    return value


def text_lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, text without its line end) of each non-blank line; DataFormatError at the first line that
    is not `encoding` text."""
    number = 0
    with open(path, encoding=encoding) as f:
        try:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield number, line.rstrip("\n").rstrip("\r")
        except UnicodeDecodeError as e:
            line = _undecodable_line(path, encoding, number + 1)
            raise DataFormatError(path, line, f"not {encoding.upper()} text ({e.reason})") from None


def _undecodable_line(path: str, encoding: str, start: int) -> int:
    """The first line from `start` on that is not `encoding` text. A text-mode file decodes a chunk of many
    lines at once, so its error comes at the chunk's first line; only this error path reads line by line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number >= start:
                try:
                    raw.decode(encoding)
                except UnicodeDecodeError:
                    return number
    return start


def json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON Lines file; DataFormatError names the line of
    anything that is not UTF-8 JSON holding an object."""
    for number, line in text_lines(path):
        yield number, _json_record(line, path, number)


def _json_record(line: str, path: str, number: int) -> dict:
    """The JSON object of text line `number` of `path`; DataFormatError when it is not JSON holding an object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, number, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataFormatError(path, number, f"expected a JSON object, got {type(record).__name__}")
    return record


def _detect_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    seen, repeated, first = set(), False, None
    for number, line in text_lines(path):
        fields = line.split()
        if first is None:
            first = fields
            if "user_id" in line and "item_id" in line:
                return "csv"
            if "::" in line:
                return "movielens"
        if len(fields) > 2:
            return "sequences"
        repeated |= fields[0] in seen
        seen.add(fields[0])
    return "pairs" if repeated else "sequences"


def read_interactions(path: str, fmt: str = "auto") -> list[UserSequence]:
    """User sequences from sequence text, pairs text or CSV/TSV (FORMATS.md §1), users in file order."""
    if fmt not in INTERACTION_FORMATS:
        raise ValueError(f"unknown interaction format {fmt!r}; expected one of {INTERACTION_FORMATS}")
    fmt = _detect_format(path) if fmt == "auto" else fmt
    if fmt == "csv":
        return _read_csv(path)
    if fmt == "movielens":
        return _read_movielens(path)
    users: dict[str, UserSequence] = {}
    for number, line in text_lines(path):
        fields = line.split()
        if fmt == "sequences":
            if len(fields) < 2:
                raise DataFormatError(path, number, "expected `user item item ...`, found no items")
            if fields[0] in users:
                raise DataFormatError(path, number, f"user {fields[0]!r} appears on two lines of a sequence file")
            users[fields[0]] = UserSequence(fields[0], fields[1:])
        else:
            if len(fields) != 2:
                raise DataFormatError(path, number, f"expected `user item`, found {len(fields)} fields")
            users.setdefault(fields[0], UserSequence(fields[0], [])).items.append(fields[1])
    return list(users.values())


def _read_csv(path: str) -> list[UserSequence]:
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline()
        delimiter = "\t" if "\t" in header else ","
        names = [n.strip() for n in next(csv.reader([header], delimiter=delimiter), [])]
        missing = [n for n in ("user_id", "item_id") if n not in names]
        if missing:
            raise DataFormatError(path, 1, f"header lacks column(s) {', '.join(missing)}; found {names}")
        rows: dict[str, list[tuple[float, int, str]]] = {}
        has_time = "timestamp" in names
        for number, row in enumerate(csv.reader(f, delimiter=delimiter), start=2):
            if not row or all(not v.strip() for v in row):
                continue
            if len(row) != len(names):
                raise DataFormatError(path, number, f"expected {len(names)} fields, found {len(row)}")
            record = dict(zip(names, (v.strip() for v in row)))
            user, item = record["user_id"], record["item_id"]
            if not user or not item:
                raise DataFormatError(path, number, "empty user_id or item_id")
            stamp = 0.0
            if has_time:
                try:
                    stamp = parse_timestamp(record["timestamp"])
                except ValueError:
                    raise DataFormatError(path, number, f"bad timestamp {record['timestamp']!r}") from None
            if "rating" in record and record["rating"]:
                try:
                    float(record["rating"])
                except ValueError:
                    raise DataFormatError(path, number, f"bad rating {record['rating']!r}") from None
            rows.setdefault(user, []).append((stamp, number, item))
    return _in_time_order(rows, has_time)


def _in_time_order(rows: dict[str, list[tuple[float, int, str]]], has_time: bool) -> list[UserSequence]:
    """Users' (timestamp, line, item) events as sequences ordered by timestamp, then file order."""
    result = []
    for user, events in rows.items():
        events.sort()
        result.append(UserSequence(user, [e[2] for e in events], [e[0] for e in events] if has_time else None))
    return result


def _read_movielens(path: str) -> list[UserSequence]:
    """MovieLens `ratings.dat` (ML-1M, ML-10M): `user::item::rating::timestamp`, unix seconds."""
    rows: dict[str, list[tuple[float, int, str]]] = {}
    for number, line in text_lines(path):
        fields = line.split("::")
        if len(fields) != 4:
            raise DataFormatError(path, number, f"expected `user::item::rating::timestamp`, found {len(fields)} fields")
        user, item, rating, stamp = (f.strip() for f in fields)
        if not user or not item:
            raise DataFormatError(path, number, "empty user or item id")
        try:
            float(rating)
            seconds = float(int(stamp))
        except ValueError:
            raise DataFormatError(path, number, f"bad rating {rating!r} or timestamp {stamp!r}") from None
        rows.setdefault(user, []).append((seconds, number, item))
    return _in_time_order(rows, True)


def read_catalog(path: str) -> dict[str, CatalogItem]:
    """Catalog JSON Lines (FORMATS.md §2) keyed by item id."""
    return {item.item_id: item for item in unique_catalog_items(path)}


def unique_catalog_items(path: str) -> Iterator[CatalogItem]:
    """The items of a catalog, read streaming (only their ids are held); a duplicate item id is a
    DataFormatError naming its line."""
    seen: set[str] = set()
    for number, item in iter_catalog(path):
        if item.item_id in seen:
            raise DataFormatError(path, number, f"duplicate item_id {item.item_id!r}")
        seen.add(item.item_id)
        yield item


def iter_catalog(path: str) -> Iterator[tuple[int, CatalogItem]]:
    """(line number, item) of each line of a catalog, checked field by field, without holding the catalog:
    for catalogs too large to keep as objects. Duplicate item ids are the caller's to find."""
    known = {"item_id", "title", "artist", "genres", "release_date", "popularity"}
    for number, record in json_lines(path):
        if "item_id" not in record:
            raise DataFormatError(path, number, "missing required field 'item_id'")
        item_id = _id(record["item_id"], path, number, "item_id")
        genres = record.get("genres", [])
        if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
            raise DataFormatError(path, number, "'genres' must be a list of strings")
        date = record.get("release_date")
        if date is not None:
            try:
                datetime.date.fromisoformat(str(date)[:10])
            except ValueError:
                raise DataFormatError(path, number, f"bad release_date {date!r} (expected YYYY-MM-DD)") from None
        popularity = record.get("popularity")
        if popularity is not None and (isinstance(popularity, bool) or not isinstance(popularity, (int, float))):
            raise DataFormatError(path, number, f"'popularity' must be a number, got {popularity!r}")
        for field in ("title", "artist"):
            if record.get(field) is not None and not isinstance(record[field], str):
                raise DataFormatError(path, number, f"'{field}' must be a string")
        yield number, CatalogItem(item_id, record.get("title"), record.get("artist"), genres, date, popularity,
                                  {k: v for k, v in record.items() if k not in known})


def read_item_attributes(path: str) -> dict[str, list[int]]:
    """Item side features as one JSON object `{item_id: [attribute_id, ...]}` (the S3-Rec
    `*_item2attributes.json` files: integer-coded category and brand ids)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, f"not valid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, 1, "expected one JSON object {item_id: [attribute ids]}")
    out = {}
    for item, attrs in data.items():
        if not isinstance(attrs, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in attrs):
            raise DataFormatError(path, 1, f"item {item!r}: attributes must be a list of integers, got {attrs!r}")
        out[str(item)] = attrs
    return out


def parse_context(value, path: str, line: int) -> tuple[dict[str, str], str | None]:
    """Categorical context fields as strings, and the free-text intent."""
    if value is None:
        return {}, None
    if not isinstance(value, dict):
        raise DataFormatError(path, line, "'context' must be an object")
    fields, intent = {}, None
    for key, v in value.items():
        if key == "intent":
            if v is not None and not isinstance(v, str):
                raise DataFormatError(path, line, "'context.intent' must be a string")
            intent = v or None
        elif isinstance(v, (str, int, float)) and not isinstance(v, bool):
            fields[key] = str(v)
        elif v is not None:
            raise DataFormatError(path, line, f"context field {key!r} must be a string or number")
    return fields, intent


def parse_page_log(record: dict, path: str, line: int) -> PageLog:
    """Validates one page-log object (FORMATS.md §3)."""
    for field in ("user_id", "page"):
        if field not in record:
            raise DataFormatError(path, line, f"missing required field {field!r}")
    user = _id(record["user_id"], path, line, "user_id")
    page = record["page"]
    if not isinstance(page, list) or not page:
        raise DataFormatError(path, line, "'page' must be a non-empty list of shelves")
    shelves = []
    for k, shelf in enumerate(page):
        where = f"page[{k}]"
        if not isinstance(shelf, dict) or not isinstance(shelf.get("shelf"), str) or not shelf["shelf"]:
            raise DataFormatError(path, line, f"{where} must be an object with a non-empty 'shelf' name")
        items = shelf.get("items")
        if not isinstance(items, list) or not items:
            raise DataFormatError(path, line, f"{where}.items must be a non-empty list")
        items = [_id(i, path, line, f"{where}.items entry") for i in items]
        streams = shelf.get("streams")
        if streams is not None:
            if not isinstance(streams, list) or len(streams) != len(items):
                raise DataFormatError(path, line, f"{where}.streams must have one number per item "
                                      f"({len(items)})")
            if not all(_is_number(s) and s >= 0 for s in streams):
                raise DataFormatError(path, line, f"{where}.streams must be non-negative numbers")
        propensities = shelf.get("propensities")
        if propensities is not None:
            if not isinstance(propensities, list) or len(propensities) != len(items):
                raise DataFormatError(path, line, f"{where}.propensities must have one number per item ({len(items)})")
            if not all(_is_number(p) and 0 < p <= 1 for p in propensities):
                raise DataFormatError(path, line, f"{where}.propensities must be probabilities in (0, 1]")
        shelves.append(Shelf(shelf["shelf"], items, streams, propensities))
    history = record.get("history", []) or []
    if not isinstance(history, list):
        raise DataFormatError(path, line, "'history' must be a list of item ids")
    history = [_id(i, path, line, "history entry") for i in history]
    context, intent = parse_context(record.get("context"), path, line)
    stamp = record.get("timestamp")
    if stamp is not None:
        try:
            stamp = parse_timestamp(str(stamp))
        except ValueError:
            raise DataFormatError(path, line, f"bad timestamp {stamp!r}") from None
    request_id = record.get("request_id")
    log_propensity = record.get("log_propensity")
    if log_propensity is not None and not (_is_number(log_propensity) and log_propensity <= 0
                                           and math.isfinite(log_propensity)):
        raise DataFormatError(path, line, f"'log_propensity' must be a finite log-probability (<= 0), "
                              f"got {log_propensity!r}")
    return PageLog(user, shelves, None if request_id is None else str(request_id), stamp, context, intent, history,
                   log_propensity)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def iter_page_logs(path: str, skip_lines: Container[int] = frozenset()) -> Iterator[PageLog]:
    """Streams page-log JSON Lines (FORMATS.md §3), leaving out the lines numbered in `skip_lines` (those a
    preparation found malformed and skipped, say)."""
    if not skip_lines:
        for number, record in json_lines(path):
            yield parse_page_log(record, path, number)
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip() and number not in skip_lines:
                yield parse_page_log(json_object(raw, path, number), path, number)


def json_object(raw: bytes, path: str, number: int) -> dict:
    """The JSON object of one raw line `number` of `path`; DataFormatError when it is not UTF-8 JSON holding an
    object."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, number, f"not UTF-8 text (byte {e.start} of the line)") from None
    return _json_record(line, path, number)

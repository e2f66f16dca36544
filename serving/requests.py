"""Page requests (FORMATS.md §4): validation with defaults, and the errors a client can act on."""

from __future__ import annotations

import dataclasses
import uuid

MAX_SHELVES = 20
MAX_ITEMS_PER_SHELF = 50
MAX_BEAM = 16
# Bounds on what a client may send (longer input is refused with a reason, never decoded): the prompt
# keeps the newest `max_history` history items and as many intent pieces as the model's rows hold.
MAX_TEXT = 256  # characters of an id, a context key or value
MAX_INTENT = 1_000  # characters of a free-text intent
MAX_IDS = 10_000  # entries of history, exclude_items
MAX_CONTEXT_FIELDS = 64
MAX_FAMILIARITY = 20.0  # |familiarity|: e^20 already makes any known item outrank every unknown one
SESSION_EVENTS = ("stream", "skip", "save")  # FORMATS.md §4; other event names are ignored


class RequestError(ValueError):
    """A request that cannot be served; the message says why (HTTP 400)."""


@dataclasses.dataclass
class PageRequest:
    user_id: str | None = None
    request_id: str | None = None  # the client's, echoed in the response and the impression log
    history: list[str] = dataclasses.field(default_factory=list)
    context: dict[str, str] = dataclasses.field(default_factory=dict)
    intent: str | None = None
    num_shelves: int = 6
    min_items_per_shelf: int = 4
    max_items_per_shelf: int = 10
    exclude_items: list[str] = dataclasses.field(default_factory=list)
    allowed_shelves: list[str] | None = None
    beam_size: int = 4
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_pages: int = 1
    session: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (item, event), oldest first
    familiarity: float = 0.0  # added to the logits of the history's items: > 0 familiar pages, < 0 discovery
    exploration: bool = False  # set by the server (serving/traffic.py), never by a client

    def identified(self) -> PageRequest:
        """The request with its own request id, else a new one (echoed in the response and the impression log)."""
        return self if self.request_id else dataclasses.replace(self, request_id=uuid.uuid4().hex)

    def with_session(self) -> PageRequest:
        """The request with its session events folded in: streamed and saved items join the history (newest
        last), as the later pages of a session see them in training; skipped items are excluded from the page."""
        listened = [item for item, event in self.session if event in ("stream", "save")]
        skipped = [item for item, event in self.session if event == "skip"]
        excluded = self.exclude_items + [item for item in dict.fromkeys(skipped) if item not in self.exclude_items]
        return dataclasses.replace(self, history=self.history + listened, exclude_items=excluded, session=[])


def _int(obj: dict, key: str, default: int, low: int, high: int) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{key}' must be an integer, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be between {low} and {high}, got {value}")
    return value


def _float(obj: dict, key: str, default: float, low: float, high: float) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{key}' must be a number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be between {low} and {high}, got {value}")
    return float(value)


def _text(value: str, what: str, limit: int = MAX_TEXT) -> str:
    """`value` if it is valid Unicode text of at most `limit` characters."""
    if len(value) > limit:
        raise RequestError(f"{what} has {len(value):,} characters; at most {limit:,} are accepted")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def _ids(obj: dict, key: str, limit: int = MAX_IDS) -> list[str]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise RequestError(f"'{key}' must be a list of ids")
    if len(value) > limit:
        raise RequestError(f"'{key}' has {len(value):,} entries; at most {limit:,} are accepted")
    return [_text(str(v), f"an id in '{key}'") for v in value]


def _session(obj: dict) -> list[tuple[str, str]]:
    value = obj.get("session") or []
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise RequestError("'session' must be a list of {\"item\": ..., \"event\": ...} objects")
    if len(value) > MAX_IDS:
        raise RequestError(f"'session' has {len(value):,} events; at most {MAX_IDS:,} are accepted")
    events = []
    for k, event in enumerate(value):
        item, name = event.get("item"), event.get("event")
        if isinstance(item, bool) or not isinstance(item, (str, int)) or not isinstance(name, str):
            raise RequestError(f"'session' event {k} needs an 'item' id and an 'event' name")
        if name in SESSION_EVENTS:
            events.append((_text(str(item), f"the item of 'session' event {k}"), name))
    return events


def parse_request(obj) -> PageRequest:
    """A PageRequest from a decoded JSON value; RequestError names the bad field."""
    if not isinstance(obj, dict):
        raise RequestError("a request must be a JSON object")
    if "user_id" not in obj and "history" not in obj:
        raise RequestError("a request needs 'user_id' or 'history'")
    user = obj.get("user_id")
    if user is not None and (isinstance(user, bool) or not isinstance(user, (str, int))):
        raise RequestError("'user_id' must be a string")
    if user is not None:
        user = _text(str(user), "'user_id'")
    context = obj.get("context") or {}
    if not isinstance(context, dict):
        raise RequestError("'context' must be an object")
    if len(context) > MAX_CONTEXT_FIELDS:
        raise RequestError(f"'context' has {len(context)} fields; at most {MAX_CONTEXT_FIELDS} are accepted")
    intent = context.get("intent")
    if intent is not None and not isinstance(intent, str):
        raise RequestError("'context.intent' must be a string")
    if intent is not None:
        intent = _text(intent, "'context.intent'", MAX_INTENT)
    fields = {}
    for key, value in context.items():
        if key == "intent" or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RequestError(f"context field {key!r} must be a string or number")
        fields[_text(key, "a context field name")] = _text(str(value), f"context field {key!r}")
    allowed = obj.get("allowed_shelves")
    if allowed is not None and (not isinstance(allowed, list) or not all(isinstance(s, str) for s in allowed)):
        raise RequestError("'allowed_shelves' must be a list of shelf names")
    if allowed is not None:
        if len(allowed) > MAX_IDS:
            raise RequestError(f"'allowed_shelves' has {len(allowed):,} entries; at most {MAX_IDS:,} are accepted")
        allowed = [_text(s, "a name in 'allowed_shelves'") for s in allowed]
    request_id = obj.get("request_id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
        raise RequestError("'request_id' must be a string")
    request = PageRequest(
        user_id=user, request_id=None if request_id is None else _text(str(request_id), "'request_id'"),
        history=_ids(obj, "history"), context=fields,
        intent=intent or None,
        num_shelves=_int(obj, "num_shelves", 6, 1, MAX_SHELVES),
        min_items_per_shelf=_int(obj, "min_items_per_shelf", 4, 1, MAX_ITEMS_PER_SHELF),
        max_items_per_shelf=_int(obj, "max_items_per_shelf", 10, 1, MAX_ITEMS_PER_SHELF),
        exclude_items=_ids(obj, "exclude_items"), allowed_shelves=allowed,
        beam_size=_int(obj, "beam_size", 4, 1, MAX_BEAM),
        temperature=_float(obj, "temperature", 0.0, 0.0, 100.0),
        top_k=_int(obj, "top_k", 0, 0, 1 << 30), top_p=_float(obj, "top_p", 1.0, 1e-6, 1.0),
        seed=_int(obj, "seed", 0, 0, 2**31 - 1), num_pages=_int(obj, "num_pages", 1, 1, MAX_BEAM),
        familiarity=_float(obj, "familiarity", 0.0, -MAX_FAMILIARITY, MAX_FAMILIARITY),
        session=_session(obj))
    if request.min_items_per_shelf > request.max_items_per_shelf:
        raise RequestError("'min_items_per_shelf' must not exceed 'max_items_per_shelf'")
    if request.temperature == 0 and request.num_pages > request.beam_size:
        raise RequestError("'num_pages' must not exceed 'beam_size'")
    return request

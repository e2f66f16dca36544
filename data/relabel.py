"""Training-time relabelings of logged pages: what the model is shown, not what was served.

- `with_outcome`: the page's bucketed total streams as the context field `outcome`, so a model learns what
  separates engaging pages from the logger's average one, and serving can ask for the best bucket.
- `streamed_first`: each shelf's streamed items moved to its front (most streams first, otherwise in
  logged order), so every generation step learns to continue with what users stream next, rather than
  with the logging policy's order.
- `with_user`: the user's id as the context field `user_id`, so that the model learns each known user's
  taste from all of their logged pages (a user-ID token, as TIGER and OneRec prepend); a fixed fraction of
  pages shows the field's unknown value instead, so that users the vocabulary does not know are served
  from their history alone.
- `with_hindsight_intent`: a page logged without an intent gets one written from what its user streamed on
  it (the mood and genre most of the streamed items share, say "sad jazz"), so that the model sees many
  intents next to pages that served them, not only the few logged with one.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from homegen.data.attributes import ItemAttributes
from homegen.data.formats import PageLog, Shelf

OUTCOME_FIELD = "outcome"  # context field holding a logged page's engagement (outcome-conditioned training)
OUTCOME_BUCKETS = ((0, "0"), (1, "1"), (2, "2"), (3, "3-4"), (5, "5+"))  # (lowest total streams, value)
BEST_OUTCOME = OUTCOME_BUCKETS[-1][1]
USER_FIELD = "user_id"  # context field holding the user's id (user-ID tokens)
NO_USER = ""  # a user id no vocabulary holds: the prompt gets the field's unknown token


def with_outcome(log: PageLog) -> PageLog:
    """The log with its page's total streams, bucketed, as the context field `outcome`: a model trained on
    such logs learns what separates engaging pages from the rest, and is asked for the best bucket when
    it serves."""
    total = sum(sum(shelf.streams or []) for shelf in log.page)
    bucket = [value for low, value in OUTCOME_BUCKETS if total >= low][-1]
    return dataclasses.replace(log, context={**log.context, OUTCOME_FIELD: bucket})


def streamed_first(log: PageLog) -> PageLog:
    """The log with each shelf's items ordered by streams, descending (stable)."""
    shelves = []
    for shelf in log.page:
        if not shelf.streams:
            shelves.append(shelf)
            continue
        order = sorted(range(len(shelf.items)), key=lambda k: -shelf.streams[k])
        shelves.append(Shelf(shelf.shelf, [shelf.items[k] for k in order], [shelf.streams[k] for k in order]))
    return dataclasses.replace(log, page=shelves)


def with_user(log: PageLog, unknown_fraction: float = 0.0) -> PageLog:
    """The log with its user's id as the context field `user_id`; for a fixed `unknown_fraction` of pages
    (chosen by a hash of the user and the page, the same on every pass) an id no vocabulary holds, so
    that the field's unknown token learns to stand for a user the model has not seen."""
    hidden = unknown_fraction > 0 and _page_hash(log) < unknown_fraction
    return dataclasses.replace(log, context={**log.context, USER_FIELD: NO_USER if hidden else log.user_id})


def _page_hash(log: PageLog, salt: str = "") -> float:
    """A number in [0, 1) fixed by the page (its user, request and time) and `salt`: the same on every pass,
    so a relabeling chosen for a share of the pages picks the same pages each epoch."""
    key = f"{log.user_id}|{log.request_id or ''}|{log.timestamp or 0}{salt}".encode()
    return zlib.crc32(key) / 2**32


def item_words(attributes: ItemAttributes, item_ids: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, str]]:
    """{item: {field: word}} of the `fields` among each item's attributes (`mood=sad`, `genre=jazz`; the first
    value of a field per item), for `item_ids` in the attribute table's row order."""
    wanted = set(fields)
    parsed = attributes.fields()
    out: dict[str, dict[str, str]] = {}
    for item, row in zip(item_ids, attributes.table):
        words: dict[str, str] = {}
        for a in row:
            if a > 0 and parsed[a - 1][0] in wanted:
                words.setdefault(parsed[a - 1][0], parsed[a - 1][1].lower())
        if words:
            out[item] = words
    return out


def with_hindsight_intent(log: PageLog, words: Mapping[str, Mapping[str, str]], fields: Sequence[str],
                          share: float, min_streams: int = 2) -> PageLog:
    """For a fixed `share` of the pages logged without an intent (chosen by a hash of the page, the same on
    every pass), the intent the page served in hindsight: for each of `fields` in order, the value that most of
    the page's streamed items have (`words`: item -> field -> word), if at least `min_streams` of them do
    ("sad jazz"). Pages with an intent, with fewer streams, or outside the share are unchanged."""
    if log.intent or share <= 0:
        return log
    if _page_hash(log, "|intent") >= share:
        return log
    streamed = [item for shelf in log.page for item, s in zip(shelf.items, shelf.streams or ()) if s > 0]
    chosen = []
    for field in fields:
        counts = Counter(words[item][field] for item in streamed if field in words.get(item, {}))
        if counts and (best := counts.most_common(1)[0])[1] >= min_streams:
            chosen.append(best[0])
    return dataclasses.replace(log, intent=" ".join(chosen)) if chosen else log


def relabeler(outcome: bool, order_by_streams: bool, user_tokens: bool = False, unknown_user_fraction: float = 0.0,
              hindsight_intent: Callable[[PageLog], PageLog] | None = None) -> Callable[[PageLog], PageLog]:
    """The configured relabelings, applied in turn (`hindsight_intent`, e.g. a `with_hindsight_intent`
    partial, first)."""
    add_user = lambda log: with_user(log, unknown_user_fraction)  # noqa: E731
    steps = [f for f, on in ((hindsight_intent, hindsight_intent is not None), (with_outcome, outcome),
                             (streamed_first, order_by_streams), (add_user, user_tokens)) if on]

    def apply(log: PageLog) -> PageLog:
        for step in steps:
            log = step(log)
        return log

    return apply

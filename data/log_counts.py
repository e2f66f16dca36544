"""What training's vocabulary pass reads from page logs, counted per file and merged.

`LogCounts` holds, for a set of page logs: a `VocabularyBuilder` of them (context tokens, items, shelves,
intents, in first-seen order), how often each item was on a page, and the items seen on each shelf type.
Counts of separate files merged in file order equal the counts of the files read one after another, so
`homegen prepare` counts each file in its own Beam worker and writes the merged counts into the prepared
dataset's folder (`LOG_COUNTS_FILE`); `train.py` then builds its vocabulary from them instead of reading
the logs again.

The context fields that training's relabelings write (`outcome` with `data.outcome_conditioning`, `user_id`
with `data.user_tokens`) are counted both as logged and as relabeled, so one count serves every config.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable

from etils import epath

from homegen.data.formats import PageLog
from homegen.data.relabel import OUTCOME_FIELD, USER_FIELD, with_outcome, with_user
from homegen.data.vocab import VocabularyBuilder

LOG_COUNTS_FILE = "log_counts.json"  # in a prepared dataset's folder
FORMAT_VERSION = 1
# The relabeled context fields, each with the relabeling that writes it.
RELABELINGS: dict[str, Callable[[PageLog], PageLog]] = {OUTCOME_FIELD: with_outcome, USER_FIELD: with_user}


class LogCounts:
    """Mergeable counts of page logs (see the module docstring)."""

    def __init__(self):
        self.pages = VocabularyBuilder()  # context without the relabeled fields
        self.logged = {field: Counter() for field in RELABELINGS}  # `field=value` tokens as logged
        self.relabeled = {field: Counter() for field in RELABELINGS}  # as the relabeling writes them
        self.item_counts: Counter = Counter()  # pages each item was on
        self.shelf_items: dict[str, dict[str, None]] = {}  # shelf type -> its items, first seen first

    def add_page(self, log: PageLog) -> None:
        for field, relabel in RELABELINGS.items():
            if field in log.context:
                self.logged[field][f"{field}={log.context[field]}"] += 1
            self.relabeled[field][f"{field}={relabel(log).context[field]}"] += 1
        context = {k: v for k, v in log.context.items() if k not in RELABELINGS}
        self.pages.add_page(dataclasses.replace(log, context=context))
        for shelf in log.page:
            self.item_counts.update(shelf.items)
            self.shelf_items.setdefault(shelf.shelf, {}).update(dict.fromkeys(shelf.items))

    def merge(self, other: LogCounts) -> None:
        """Adds `other`'s counts as if its pages came after these."""
        self.pages.merge(other.pages)
        for field in RELABELINGS:
            self.logged[field].update(other.logged[field])
            self.relabeled[field].update(other.relabeled[field])
        self.item_counts.update(other.item_counts)
        for shelf, items in other.shelf_items.items():
            self.shelf_items.setdefault(shelf, {}).update(items)

    def add_to(self, builder: VocabularyBuilder, outcome_conditioning: bool, user_tokens: bool) -> None:
        """Merges the pages into `builder` with the context fields the config's relabelings write, as if every
        page had been relabeled and added (`relabel.relabeler(outcome_conditioning, False, user_tokens)`)."""
        builder.merge(self.pages)
        for field, relabeled in ((OUTCOME_FIELD, outcome_conditioning), (USER_FIELD, user_tokens)):
            builder.context.update(self.relabeled[field] if relabeled else self.logged[field])

    # --- persistence ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        items = list(self.item_counts)
        return {"version": FORMAT_VERSION, **self.pages.pages_to_json(),
                "logged": {f: dict(c) for f, c in self.logged.items()},
                "relabeled": {f: dict(c) for f, c in self.relabeled.items()},
                "item_counts": [items, [self.item_counts[i] for i in items]],
                "shelf_items": {shelf: list(items) for shelf, items in self.shelf_items.items()}}

    @classmethod
    def from_json(cls, data: dict) -> LogCounts:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"log counts of format {data.get('version')!r}; this homegen reads {FORMAT_VERSION}")
        out = cls()
        out.pages = VocabularyBuilder.pages_from_json(data)
        out.logged = {f: Counter(data["logged"][f]) for f in RELABELINGS}
        out.relabeled = {f: Counter(data["relabeled"][f]) for f in RELABELINGS}
        out.item_counts = Counter(dict(zip(*data["item_counts"])))
        out.shelf_items = {shelf: dict.fromkeys(items) for shelf, items in data["shelf_items"].items()}
        return out

    @classmethod
    def load(cls, path: str) -> LogCounts:
        """The counts saved as JSON (`to_json`) at `path`; a file that is not such counts is a ValueError naming it."""
        try:
            return cls.from_json(json.loads(epath.Path(path).read_text()))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not page-log counts written by `homegen prepare` ({e})") from None


def prepared_counts_path(dataset_dir: str) -> str | None:
    """The counts `homegen prepare` wrote with the dataset in `dataset_dir`, or None (another preparation)."""
    path = epath.Path(dataset_dir) / LOG_COUNTS_FILE
    return str(path) if path.exists() else None

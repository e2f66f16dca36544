"""Item attributes the model embeds beside each item's own token (`data.item_attributes`): category and
brand ids of the Amazon files, or a catalog's artist, genres, release month and extra fields. An atomic
item's input and output embedding is its own row plus the mean of its attributes' rows, so items that
share attributes share part of their representation (rare items learn from their frequent neighbours)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from homegen.data.formats import CatalogItem
from homegen.data.semantic_ids import catalog_attributes

NO_ATTRIBUTE = 0  # attribute id of an empty slot (and of every token that is not an item)


@dataclasses.dataclass
class ItemAttributes:
    """`names[a - 1]` is attribute id a; `table[k]` holds item k's attribute ids, NO_ATTRIBUTE padded."""

    names: list[str]
    table: np.ndarray  # int32 (num_items, per_item)

    @classmethod
    def from_mapping(cls, item_ids: Sequence[str], attributes: Mapping[str, Sequence], per_item: int
                     ) -> ItemAttributes:
        """The attributes of `item_ids` (ids or names, any hashable printed as text), at most `per_item`
        each in their listed order; items absent from `attributes` have none."""
        if per_item < 1:
            raise ValueError(f"data.max_item_attributes must be >= 1, got {per_item}")
        names: dict[str, int] = {}
        table = np.full((len(item_ids), per_item), NO_ATTRIBUTE, np.int32)
        for k, item in enumerate(item_ids):
            values = list(dict.fromkeys(str(a) for a in attributes.get(item, ())))[:per_item]
            table[k, :len(values)] = [names.setdefault(v, len(names) + 1) for v in values]
        if not names:
            raise ValueError("data.item_attributes: none of the items has an attribute")
        return cls(list(names), table)

    @property
    def num_attributes(self) -> int:
        return len(self.names)

    @property
    def per_item(self) -> int:
        return self.table.shape[1]

    def coverage(self) -> float:
        """Fraction of items with at least one attribute."""
        return float(np.mean((self.table != NO_ATTRIBUTE).any(axis=1))) if len(self.table) else 0.0

    def fields(self) -> list[tuple[str, str]]:
        """Each attribute as (field, value): `genre=jazz` -> ("genre", "jazz"); ("", name) for a bare id."""
        return [tuple(name.split("=", 1)) if "=" in name else ("", name) for name in self.names]

    def words(self) -> list[str]:
        """Each attribute's value as words (`genre=jazz` -> "jazz", `artist=Nina Simone` -> "nina simone"), ""
        for a value without letters (a date, a number)."""
        values = [value.split(":", 1)[-1].lstrip("\u2581") for _, value in self.fields()]
        return [v.lower() if any(c.isalpha() for c in v) else "" for v in values]

    def token_table(self, vocab_size: int, item_offset: int) -> np.ndarray:
        """(vocab_size, per_item) attribute ids of every token: the items' rows, NO_ATTRIBUTE elsewhere."""
        out = np.full((vocab_size, self.per_item), NO_ATTRIBUTE, np.int32)
        out[item_offset:item_offset + len(self.table)] = self.table
        return out

    def to_json(self) -> dict:
        return {"names": self.names, "table": self.table.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> ItemAttributes:
        return cls(list(data["names"]), np.asarray(data["table"], np.int32))


def catalog_item_attributes(catalog: Mapping[str, CatalogItem]) -> dict[str, list[str]]:
    """Each catalog item's attributes: artist, genres and release month (`catalog_attributes`), then its extra
    fields (FORMATS.md §2) as `field=value`, numbers rounded to one decimal (`energy=0.4`)."""
    out = catalog_attributes(catalog)
    for item_id, item in catalog.items():
        for field, value in sorted(item.extra.items()):
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                continue
            out[item_id].append(f"{field}={round(value, 1) if isinstance(value, float) else value}")
    return out

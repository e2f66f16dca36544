"""Growing a trained model to an extended vocabulary (new items, shelf types, context values).

Every parameter with a "vocab" axis (the embedding, an untied output layer, the value head's bias) gets the
extended vocabulary's rows: an old token's row is copied bit for bit to its new id, and a new token's row is
a weighted sum of old rows chosen from metadata, never random:
- an item: the mean of the old items by the same artist, else of those sharing a genre, else of all items;
- a shelf type: by analogy through its name's text pieces, mean(old shelves) + pieces(new name) -
  mean(pieces(old names)), so that a "genre_jazz_fusion" shelf starts near the other genre shelves and
  its own words;
- a context value: its field's `<unk>` row (what the model did for unseen values), else the mean of all
  context rows.
"""

from __future__ import annotations

import jax
import numpy as np
import scipy.sparse

from homegen.data.formats import CatalogItem
from homegen.data.vocab import UNKNOWN_VALUE, Vocabulary

Weights = dict[int, float]  # old token id -> weight


def _mean(tokens: list[int]) -> Weights:
    """Weights of the mean of `tokens`' rows (a token listed twice counts twice)."""
    out: Weights = {}
    for t in tokens:
        out[t] = out.get(t, 0.0) + 1.0 / len(tokens)
    return out


def _add(into: Weights, weights: Weights, scale: float = 1.0) -> Weights:
    for t, w in weights.items():
        into[t] = into.get(t, 0.0) + scale * w
    return into


def _name_pieces(vocab: Vocabulary, shelf: str) -> list[int]:
    return [vocab.text_offset + p for p in vocab.sp.encode(shelf.replace("_", " ").lower())]


class _ItemNeighbours:
    """Old item tokens by artist and by genre, to start a new item from the items most like it."""

    def __init__(self, old: Vocabulary, catalog: dict[str, CatalogItem]):
        self.by_artist: dict[str, list[int]] = {}
        self.by_genre: dict[str, list[int]] = {}
        for k, item_id in enumerate(old.items.item_ids):
            item = catalog.get(item_id)
            if item is None:
                continue
            if item.artist:
                self.by_artist.setdefault(item.artist, []).append(old.item_offset + k)
            for genre in item.genres:
                self.by_genre.setdefault(genre, []).append(old.item_offset + k)
        self.every = list(range(old.item_offset, old.size))

    def of(self, item: CatalogItem | None) -> list[int]:
        """Same artist, else a shared genre, else every old item."""
        if item is None:
            return self.every
        if item.artist in self.by_artist:
            return self.by_artist[item.artist]
        shared = sorted({t for g in item.genres for t in self.by_genre.get(g, [])})
        return shared or self.every


def new_row_weights(old: Vocabulary, new: Vocabulary, catalog: dict[str, CatalogItem]) -> dict[int, Weights]:
    """For every token of `new` that `old` lacks: its initial row as weights over old token ids."""
    out: dict[int, Weights] = {}
    old_context = set(old.context_tokens)
    context_rows = list(range(old.context_offset, old.text_offset))
    for k, token in enumerate(new.context_tokens):
        if token not in old_context:
            unknown = old._context_index.get(f"{token.split('=', 1)[0]}={UNKNOWN_VALUE}")
            out[new.context_offset + k] = {unknown: 1.0} if unknown is not None else _mean(context_rows)
    old_shelves = [old.shelf_offset + k for k in range(len(old.shelves))]
    old_names: Weights = {}
    for shelf in old.shelves:
        _add(old_names, _mean(_name_pieces(old, shelf)), 1.0 / len(old.shelves))
    for k, shelf in enumerate(new.shelves):
        if old.shelf_token(shelf) is None:
            weights = _add(_mean(old_shelves), _mean(_name_pieces(old, shelf)))
            out[new.shelf_offset + k] = _add(weights, old_names, -1.0)
    if new.items is not old.items:
        known, neighbours = old.items.index, _ItemNeighbours(old, catalog)
        for k, item_id in enumerate(new.items.item_ids):
            if item_id not in known:
                out[new.item_offset + k] = _mean(neighbours.of(catalog.get(item_id)))
    return out


def grow_parameters(params: dict, param_axes: dict, old: Vocabulary, new: Vocabulary,
                    catalog: dict[str, CatalogItem]) -> dict:
    """`params` (of a model over `old`) as numpy arrays of a model over `new` (`old.extended_with(...)`)."""
    token_map = old.token_map(new)
    weights = new_row_weights(old, new, catalog)
    new_ids = np.array(sorted(weights), np.int64)
    entries = [(row, source, w) for row, token in enumerate(new_ids) for source, w in weights[int(token)].items()]
    rows_, cols, values = (np.array(x) for x in zip(*entries)) if entries else ([], [], [])
    mixing = scipy.sparse.csr_matrix((values, (rows_, cols)), shape=(len(new_ids), old.size))

    def grow(value, axes):
        value = np.asarray(value)
        if "vocab" not in axes:
            return value
        axis = axes.index("vocab")
        rows = np.moveaxis(value, axis, 0)
        grown = np.zeros((new.size, *rows.shape[1:]), value.dtype)
        grown[token_map] = rows
        if len(new_ids):
            flat = rows.reshape(old.size, -1).astype(np.float64)
            grown[new_ids] = (mixing @ flat).reshape(len(new_ids), *rows.shape[1:]).astype(value.dtype)
        return np.moveaxis(grown, 0, axis)

    return jax.tree.map(grow, params, param_axes, is_leaf=lambda x: isinstance(x, tuple))

"""Semantic IDs for a catalog of any size, in memory that follows the catalog's arrays, not its objects
(measured to 7 x 10^7 items on a 24 GiB machine: docs/BENCHMARKS.md, "Catalog scale: semantic IDs").

The catalog's metadata (`item_attributes`, or given attribute values) is held as arrays: item ids as
fixed-width bytes, attribute values as ids; a catalog file is read once, streaming. Codes are learned on a
bounded fit set: the items of the log sample, most frequent first, topped up at random from the rest of
the catalog, up to `fit_items`. The fit set is embedded from co-occurrence PMI joined with IDF-weighted
attributes by a randomised SVD, and its residual k-means is fitted on a sample of those embeddings. Every
other item is embedded from its attributes alone by the SVD's attribute projection (as a release after
training is, `NewItemEncoder`) and quantised a chunk at a time. A catalog no larger than `fit_items` is
fitted whole.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from homegen.data.formats import DataFormatError, iter_catalog
from homegen.data.semantic_ids import (
    NewItemEncoder,
    SemanticItems,
    binary_rows,
    cooccurrence_features,
    idf_weights,
    item_attributes,
    nearest_codes,
    packed_keys,
    ranks_in_groups,
    residual_quantize,
    truncated_svd_embeddings,
    with_collision_code,
)


@dataclasses.dataclass
class CatalogColumns:
    """A catalog as arrays, in file order."""

    path: str
    item_ids: np.ndarray  # (N,) UTF-8 bytes
    lines: np.ndarray  # (N,) each item's line in the file
    offsets: np.ndarray  # (N + 1,) item k's attribute value ids are attribute_ids[offsets[k]:offsets[k + 1]]
    attribute_ids: np.ndarray  # int32 ids into `values`
    values: list[Hashable]  # attribute values: strings such as "artist=..." (or ids given by the caller)
    sorted_rows: np.ndarray  # (N,) rows in item-id order, for lookups

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def rows_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """The row of each item id, -1 for ids the catalog does not hold."""
        if not len(item_ids) or not self.num_items:
            return np.full(len(item_ids), -1, np.int64)
        wanted = np.array([i.encode() for i in item_ids])
        ordered = self.item_ids[self.sorted_rows]
        at = np.minimum(np.searchsorted(ordered, wanted), self.num_items - 1)
        return np.where(ordered[at] == wanted, self.sorted_rows[at], -1)

    def select(self, item_ids: Sequence[str]) -> CatalogColumns:
        """The columns of these items, row k for `item_ids[k]`; an item the catalog does not hold has no
        attribute values (and line 0)."""
        rows = self.rows_of(item_ids)
        held = rows >= 0
        counts, values = self._values_of(np.where(held, rows, 0), held)
        ids = np.array([i.encode() for i in item_ids]) if len(item_ids) else np.zeros(0, "S1")
        return CatalogColumns(self.path, ids, np.where(held, self.lines[np.maximum(rows, 0)], 0),
                              np.r_[0, np.cumsum(counts)], values, self.values, np.argsort(ids, kind="stable"))

    def _values_of(self, rows: np.ndarray, keep: np.ndarray | bool = True) -> tuple[np.ndarray, np.ndarray]:
        """How many attribute values each row has (0 where `keep` is False) and their ids, row after row."""
        counts = np.where(keep, self.offsets[rows + 1] - self.offsets[rows], 0)
        starts = np.repeat(self.offsets[rows] - np.r_[0, np.cumsum(counts)[:-1]], counts)
        return counts, self.attribute_ids[starts + np.arange(counts.sum())]

    def attribute_matrix(self, rows: np.ndarray, columns: np.ndarray) -> sp.csr_matrix:
        """Binary (len(rows), columns.max() + 1) matrix of these rows' attribute values, each value id v
        mapped to column `columns[v]` (values mapped to -1 left out)."""
        counts, values = self._values_of(rows)
        cols = columns[values]
        keep = cols >= 0
        return binary_rows(np.repeat(np.arange(len(rows)), counts)[keep], cols[keep],
                           (len(rows), int(columns.max()) + 1 if len(columns) else 0))


@dataclasses.dataclass
class CatalogCodes:
    """What `build_catalog_codes` learned."""

    codes: np.ndarray  # (N, levels + 1) int32, row k for item_ids[k]; no two rows alike
    encoder: NewItemEncoder | None  # codes items added later from their attributes (None: not strings)
    fit_rows: np.ndarray  # the rows the codes were fitted on; the others were coded from metadata


def read_catalog_columns(path: str, pieces: Callable[[str], list[str]] | None = None,
                         chunk: int = 1 << 20) -> CatalogColumns:
    """Reads a catalog (FORMATS.md §2) streaming, `chunk` lines at a time, into `CatalogColumns` with each
    item's `item_attributes`; a bad line or a duplicate item id is a DataFormatError naming the line."""
    rows = ((number, item.item_id, item_attributes(item, pieces)) for number, item in iter_catalog(path))
    return _columns(path, rows, chunk)


def columns_from_attributes(item_ids: Sequence[str], attributes: Mapping[str, Sequence[Hashable]]
                            ) -> CatalogColumns:
    """`CatalogColumns` of items held in memory: `attributes` maps some of them to attribute values
    (ids, or strings as `item_attributes` gives them); row k is `item_ids[k]`, its "line" k + 1."""
    empty: list = []
    return _columns("", ((k + 1, i, attributes.get(i, empty)) for k, i in enumerate(item_ids)), 1 << 20)


def _columns(path: str, rows: Iterator[tuple[int, str, Sequence[Hashable]]], chunk: int) -> CatalogColumns:
    """Columns of (line, item id, attribute values) rows, gathered `chunk` rows at a time."""
    value_ids: dict[Hashable, int] = {}
    ids, lines, counts, attrs = [], [], [], []
    chunk_ids, chunk_lines, chunk_counts, chunk_attrs = [], [], [], []

    def flush() -> None:
        if chunk_ids:
            ids.append(np.array(chunk_ids))
            lines.append(np.array(chunk_lines, np.int64))
            counts.append(np.array(chunk_counts, np.int64))
            attrs.append(np.array(chunk_attrs, np.int32))
        for part in (chunk_ids, chunk_lines, chunk_counts, chunk_attrs):
            part.clear()

    for number, item_id, values in rows:
        chunk_ids.append(item_id.encode())
        chunk_lines.append(number)
        chunk_counts.append(len(values))
        chunk_attrs.extend(value_ids.setdefault(v, len(value_ids)) for v in values)
        if len(chunk_ids) == chunk:
            flush()
    flush()
    item_ids = np.concatenate(ids) if ids else np.zeros(0, "S1")
    line_numbers = np.concatenate(lines) if lines else np.zeros(0, np.int64)
    ids.clear()  # frees the chunks before the sort
    sorted_rows = np.argsort(item_ids, kind="stable")
    same = np.flatnonzero(item_ids[sorted_rows[1:]] == item_ids[sorted_rows[:-1]])
    if len(same):
        first, second = sorted(sorted_rows[same[0]:same[0] + 2])
        raise DataFormatError(path, int(line_numbers[second]), f"duplicate item_id {item_ids[second].decode()!r} "
                              f"(first on line {int(line_numbers[first])})")
    offsets = np.r_[0, np.cumsum(np.concatenate(counts))] if counts else np.zeros(1, np.int64)
    return CatalogColumns(path, item_ids, line_numbers, offsets,
                          np.concatenate(attrs) if attrs else np.zeros(0, np.int32), list(value_ids), sorted_rows)


def build_catalog_codes(columns: CatalogColumns, sequences: Iterable[Sequence[str]], *, fit_items: int = 1_000_000,
                        levels: int = 3, codes: int = 256, dim: int = 64, seed: int = 0, chunk: int = 1 << 20,
                        progress: Callable[[str], None] = lambda phase: None) -> CatalogCodes:
    """Codes for every catalog item and the encoder that codes later items from their metadata.
    `sequences` (item ids) are the bounded log sample co-occurrence is learned from; it must not hold
    validation or test targets."""
    rng = np.random.default_rng(seed)
    fit_rows, local_sequences = _fit_set(columns, sequences, fit_items, rng)
    progress(f"fit set: {len(fit_rows):,} items, {len(local_sequences):,} sequences")
    cooccurrence = cooccurrence_features(local_sequences, len(fit_rows))
    progress(f"co-occurrence PMI ({cooccurrence.nnz:,} pairs)")
    used_values = np.unique(columns.attribute_matrix(fit_rows, np.arange(len(columns.values))).indices)
    value_column = np.full(len(columns.values), -1, np.int64)
    value_column[used_values] = np.arange(len(used_values))
    attributes = columns.attribute_matrix(fit_rows, value_column)
    idf = idf_weights(attributes)
    features = sp.hstack([cooccurrence, attributes @ sp.diags(idf)]).tocsr()
    progress(f"attribute features ({len(used_values):,} values)")
    embeddings, projection = truncated_svd_embeddings(features, dim, seed)
    progress(f"randomised SVD to {dim} dimensions")
    fit_codes, centroids = residual_quantize(embeddings, levels, codes, seed)
    names = [columns.values[v] for v in used_values]
    coder = NewItemEncoder(names, idf, projection[len(fit_rows):], centroids)
    progress(f"residual k-means, {levels} levels x {codes} codes, on the fit set")

    def embed(rows: np.ndarray) -> np.ndarray:
        """The rows' embeddings: the SVD's for the fit set, from their attributes for the others."""
        at = np.minimum(np.searchsorted(fit_rows, rows), len(fit_rows) - 1)
        fitted = fit_rows[at] == rows
        out = np.zeros((len(rows), embeddings.shape[1]), np.float32)
        out[fitted] = embeddings[at[fitted]]
        out[~fitted] = coder.embed_columns(columns.attribute_matrix(rows[~fitted], value_column))
        return out

    prefixes = np.zeros((columns.num_items, levels), np.int32)
    prefixes[fit_rows] = fit_codes
    in_fit = np.zeros(columns.num_items, bool)
    in_fit[fit_rows] = True
    rest = np.flatnonzero(~in_fit)
    del in_fit
    for start in range(0, len(rest), chunk):
        rows = rest[start:start + chunk]
        prefixes[rows] = nearest_codes(embed(rows), list(centroids))
    progress(f"{len(rest):,} more items coded from their metadata")
    moved, over = spread_full_prefixes(prefixes, embed, centroids, capacity=codes)
    progress(f"{moved:,} items moved out of prefixes holding more than {codes} items"
             + (f" ({over:,} could not be)" if over else ""))
    out = with_collision_code(prefixes)
    progress(f"collision codes (level sizes {(out.max(axis=0) + 1).tolist()})")
    # Later items are coded from attribute strings, as catalogs give them; ids given by a caller cannot be.
    encoder = coder if names and all(isinstance(n, str) for n in names) else None
    return CatalogCodes(out, encoder, fit_rows)


def spread_full_prefixes(prefixes: np.ndarray, embed: Callable[[np.ndarray], np.ndarray], centroids: np.ndarray,
                         capacity: int, window: int = 8) -> tuple[int, int]:
    """Moves the items of a code tuple held by more than `capacity` items, beyond its first `capacity`
    rows, to their next nearest last-level code that still has room under the same shorter prefix (in
    place), so the collision code stays within `capacity` values. `embed(rows)` gives the rows'
    embeddings. Without it, items coded from the same few attributes pile onto one tuple (4,500 on one at
    10^7 items), and the collision code's level, which decoding reads whole, grows with the catalog. Memory
    follows the items that move: their next `window` choices are ranked at a time. Returns (items moved,
    items left over because their shorter prefix was full)."""
    n, levels = prefixes.shape
    codes = centroids.shape[1]
    key = packed_keys(prefixes, [codes] * levels)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    sizes = np.diff(np.r_[starts, n])
    held_keys, held = sorted_key[starts], np.minimum(sizes, capacity)  # what stays where it is
    del sorted_key
    full = np.flatnonzero(sizes > capacity)
    extra = sizes[full] - capacity
    first_extra = starts[full] + capacity  # in sorted order: each full tuple's rows past its capacity
    positions = np.repeat(first_extra - np.r_[0, np.cumsum(extra)[:-1]], extra) + np.arange(extra.sum())
    movers = np.sort(order[positions])
    del order, positions
    if not len(movers):
        return 0, 0
    shorter = key[movers] - prefixes[movers, levels - 1]  # the key with the last code 0
    del key
    added_keys, added = np.zeros(0, np.int64), np.zeros(0, np.int64)
    pending = np.arange(len(movers))
    for lo in range(1, codes, window):
        if not len(pending):
            break
        ranked = _ranked_last_codes(embed, centroids, prefixes, movers[pending], lo, lo + window)
        alive = np.arange(len(pending))
        for column in range(ranked.shape[1]):
            if not len(alive):
                break
            target = shorter[pending[alive]] + ranked[alive, column]
            occupied = _count_at(held_keys, held, target) + _count_at(added_keys, added, target)
            by_target = np.argsort(target, kind="stable")
            t = target[by_target]
            admit = ranks_in_groups(t) < capacity - occupied[by_target]
            placed = alive[by_target[admit]]
            prefixes[movers[pending[placed]], levels - 1] = ranked[placed, column]
            new_keys, new = np.unique(t[admit], return_counts=True)
            added_keys, added = _merge_counts(added_keys, added, new_keys, new)
            alive = np.sort(alive[by_target[~admit]])
        pending = pending[alive]
    return len(movers) - len(pending), len(pending)


def _ranked_last_codes(embed: Callable[[np.ndarray], np.ndarray], centroids: np.ndarray, prefixes: np.ndarray,
                       rows: np.ndarray, lo: int, hi: int, chunk: int = 1 << 16) -> np.ndarray:
    """(len(rows), hi - lo) uint16: the last-level codes that are each row's lo-th to (hi-1)-th nearest."""
    levels, codes = centroids.shape[:2]
    last = centroids[levels - 1]
    out = np.zeros((len(rows), min(hi, codes) - lo), np.uint16)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        residual = embed(part) - sum(centroids[level, prefixes[part, level]] for level in range(levels - 1))
        distance = (last ** 2).sum(1)[None] - 2 * residual @ last.T
        out[start:start + len(part)] = np.argsort(distance, axis=1)[:, lo:hi]
    return out


def _count_at(keys: np.ndarray, counts: np.ndarray, at: np.ndarray) -> np.ndarray:
    """counts[k] where keys[k] == at (keys sorted), else 0."""
    if not len(keys):
        return np.zeros(len(at), np.int64)
    index = np.minimum(np.searchsorted(keys, at), len(keys) - 1)
    return np.where(keys[index] == at, counts[index], 0)


def _merge_counts(keys: np.ndarray, counts: np.ndarray, more_keys: np.ndarray, more: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted (keys, counts) tallies as one."""
    merged, inverse = np.unique(np.concatenate([keys, more_keys]), return_inverse=True)
    return merged, np.bincount(inverse.ravel(), weights=np.concatenate([counts, more]), minlength=len(merged)
                               ).astype(np.int64)


def _fit_set(columns: CatalogColumns, sequences: Iterable[Sequence[str]], fit_items: int,
             rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """The fit set's rows (the logged items, most frequent first, topped up at random, at most `fit_items`)
    and the sequences as positions in it (items outside it dropped)."""
    sequences = [list(s) for s in sequences]
    logged = [item for item, _ in Counter(itertools.chain.from_iterable(sequences)).most_common()]
    logged_rows = columns.rows_of(logged)
    logged_rows = logged_rows[logged_rows >= 0][:fit_items]
    fit_rows = logged_rows
    room = min(fit_items, columns.num_items) - len(logged_rows)
    if room > 0:
        is_logged = np.zeros(columns.num_items, bool)
        is_logged[logged_rows] = True
        others = np.flatnonzero(~is_logged)
        fit_rows = np.concatenate([logged_rows, rng.choice(others, room, replace=False)])
    fit_rows = np.sort(fit_rows)
    position = {item.decode(): k for k, item in enumerate(columns.item_ids[fit_rows].tolist())}
    local = [np.array([position[i] for i in s if i in position], np.int64) for s in sequences]
    return fit_rows, local


def build_semantic_items(item_ids: Sequence[str], train_sequences: Iterable[Sequence[str]],
                         attributes: Mapping[str, Sequence[Hashable]] | None = None, *, levels: int = 3,
                         codes: int = 256, dim: int = 64, seed: int = 0, fit_items: int = 1_000_000,
                         embeddings: np.ndarray | None = None,
                         progress: Callable[[str], None] = lambda phase: None) -> SemanticItems:
    """The tokenizer of `build_catalog_codes` for items held in memory: co-occurrence in `train_sequences`
    (which must not contain validation or test targets) and optional attribute values per item (ids, or
    strings as `catalog_attributes` gives them). With string attributes the result can also code items
    first seen later, from their attributes alone (`SemanticItems.add`). `progress` is told each phase.

    `embeddings` (items, d), row k for `item_ids[k]` (e.g. a trained atomic model's item embeddings), are
    quantised instead, each scaled to unit length; sequences and attributes are then unused and the result
    cannot code new items."""
    if embeddings is not None:
        prefixes, _ = residual_quantize(_unit_rows(embeddings, len(item_ids)), levels, codes, seed)
        progress(f"residual k-means, {levels} levels x {codes} codes")
        return SemanticItems(item_ids, with_collision_code(prefixes))
    return semantic_items_of_columns(item_ids, columns_from_attributes(item_ids, attributes or {}), train_sequences,
                                     levels=levels, codes=codes, dim=dim, seed=seed, fit_items=fit_items,
                                     progress=progress)


def semantic_items_of_columns(item_ids: Sequence[str], columns: CatalogColumns,
                              train_sequences: Iterable[Sequence[str]], *, levels: int = 3, codes: int = 256,
                              dim: int = 64, seed: int = 0, fit_items: int = 1_000_000,
                              progress: Callable[[str], None] = lambda phase: None) -> SemanticItems:
    """The tokenizer of `build_catalog_codes` for `item_ids`, whose columns (row k for `item_ids[k]`: a
    catalog's `select`, or items held in memory) are `columns`; the ids are kept as given, not decoded again
    from the columns' bytes (10^7 strings)."""
    if len(item_ids) != columns.num_items:
        raise ValueError(f"{len(item_ids)} item ids for {columns.num_items} rows of columns")
    built = build_catalog_codes(columns, train_sequences, fit_items=fit_items, levels=levels, codes=codes, dim=dim,
                                seed=seed, progress=progress)
    items = SemanticItems(item_ids, built.codes, built.encoder)
    progress(f"tokenizer (level sizes {items.level_sizes})")
    return items


def _unit_rows(embeddings: np.ndarray, num_items: int) -> np.ndarray:
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or len(embeddings) != num_items:
        raise ValueError(f"item embeddings must be (items, dim) for {num_items} items, got {embeddings.shape}")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    if not np.isfinite(embeddings).all() or (norms == 0).any():
        raise ValueError("item embeddings hold a zero or non-finite row")
    return embeddings / norms

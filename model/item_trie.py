"""The catalog as constrained decoding reads it, built once per checkpoint on the host and kept on the device.

Shelf eligibility is a bit per (shelf, item). For semantic IDs (items as L-code tuples) the catalog is also
the trie of its code tuples, numbered breadth first: the root is node 0, then the nodes of level 1 (distinct
first codes), of level 2 (distinct two-code prefixes), ..., of level L-1; these are the I inner nodes. The
leaves follow, leaf I + k being item row k (rows are sorted by code tuple). Breadth-first numbering makes
every node's children consecutive, sorted by code: node n's children are [first_child[n], first_child[n+1]),
so a decoding step reads at most one codebook's worth of entries, whatever the catalog's size. Each inner
node below the root keeps, per shelf, how many items under it that shelf admits for every request; what a
page or a request takes away is subtracted per row from short lists (`model/grammar.py`).

Device bytes per item: S / 8 (eligibility bits) + 2 (last code) + (inner nodes / N) x (4 + 2 + S x count
bytes), count bytes the smallest unsigned type that holds a level's largest count (1 at the level above the
leaves when its fan-out is under 256). Atomic items keep the bits alone: an item's row is its token.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ItemTables:
    """What decoding needs of the catalog, on the device once per checkpoint."""

    shelf_bits: jax.Array  # (S, ceil(N / 8)) uint8: bit k % 8 of byte k // 8 of row s: shelf s admits item k
    shelf_counts: jax.Array  # (S,) int32: items each shelf admits for every request
    first_child: jax.Array  # (I + 1,) int32: node n's children are [first_child[n], first_child[n + 1])
    inner_codes: jax.Array  # (I,) each inner node's code at its level (the root's is 0)
    leaf_codes: jax.Array  # (N,) each item's last code; atomic: (0,), an item's row is its token
    level_counts: tuple[jax.Array, ...]  # levels 1..L-1: (nodes of the level, S) admitted items under each node

    @property
    def num_inner(self) -> int:
        """I: the inner nodes, root included; leaf I + k is item row k."""
        return self.first_child.shape[0] - 1

    @property
    def level_starts(self) -> tuple[int, ...]:
        """The first node id of each level 1..L-1 (static: read from the tables' shapes)."""
        return tuple(int(x) for x in np.cumsum([1] + [c.shape[0] for c in self.level_counts[:-1]]))

    def nbytes(self) -> int:
        """Device bytes of the tables."""
        return sum(x.nbytes for x in jax.tree.leaves(self))


def device_memory_free() -> int:
    """Bytes the default device can still take: its allocator's limit less what is in use (accelerators),
    else the host's available memory (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_fits(items: int, nbytes: int) -> None:
    free = device_memory_free()
    if nbytes > free:
        raise ValueError(f"the decoding tables of {items:,} items need {nbytes / 2**30:,.2f} GiB on the device, more "
                         f"than its {free / 2**30:,.2f} GiB free: serve on a larger device or fewer shelves")


def _smallest_dtype(largest: int, signed: bool = False):
    kinds = (np.int16, np.int32) if signed else (np.uint8, np.uint16, np.int32)
    return next(t for t in kinds if largest <= np.iinfo(t).max)


def _check_sorted_unique(codes: np.ndarray) -> None:
    """Raises ValueError unless the rows are strictly increasing code tuples (the trie's numbering needs it)."""
    equal_so_far = np.ones(len(codes) - 1, bool) if len(codes) else np.zeros(0, bool)
    out_of_order = np.zeros_like(equal_so_far)
    for level in range(codes.shape[1]):
        before, after = codes[:-1, level], codes[1:, level]
        out_of_order |= equal_so_far & (after < before)
        equal_so_far &= after == before
    if out_of_order.any() or equal_so_far.any():
        row = int(np.flatnonzero(out_of_order | equal_so_far)[0]) + 1
        raise ValueError(f"code table row {row} is not after row {row - 1} in code-tuple order (rows must be "
                         "sorted, tuples distinct)")


def build_item_tables(shelf_items: np.ndarray, codes: np.ndarray | None = None) -> ItemTables:
    """The device tables of a catalog: `shelf_items` (S, N) bool, what each shelf admits for every request,
    and for semantic IDs the (N, L) code table, rows sorted by code tuple (None or one column: atomic)."""
    static = np.asarray(shelf_items, bool)
    s, n = static.shape
    bits = np.packbits(static, axis=1, bitorder="little")
    counts = np.array([np.count_nonzero(row) for row in static], np.int32)
    if codes is None or np.shape(codes)[1] == 1:
        _check_fits(n, bits.nbytes)
        return ItemTables(jnp.asarray(bits), jnp.asarray(counts), jnp.asarray([1, 1 + n], jnp.int32),
                          jnp.zeros((1,), jnp.int16), jnp.zeros((0,), jnp.int16), ())
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) != n:
        raise ValueError(f"code table of shape {codes.shape}, expected ({n}, levels)")
    _check_sorted_unique(codes)
    levels = codes.shape[1]
    code_dtype = _smallest_dtype(int(codes.max(initial=0)), signed=True)
    starts, new_node = [], np.zeros(n, bool)  # starts[d - 1]: the first item row of each level-d node
    new_node[:1] = True
    for level in range(1, levels):
        new_node[1:] |= codes[1:, level - 1] != codes[:-1, level - 1]
        starts.append(np.flatnonzero(new_node))
    level_first = np.cumsum([1] + [len(x) for x in starts])  # node id of each level's first node; last: I
    inner = int(level_first[-1])
    if inner + n > np.iinfo(np.int32).max:
        raise ValueError(f"{inner + n:,} trie nodes: more than int32 node ids hold ({np.iinfo(np.int32).max:,})")
    # A node's count is at most the items under it: the smallest type that holds a level's largest node.
    count_types = [np.dtype(_smallest_dtype(int(np.diff(np.append(x, n)).max()))) for x in starts]
    count_bytes = sum(len(x) * s * t.itemsize for x, t in zip(starts, count_types))
    code_bytes = (inner + n) * np.dtype(code_dtype).itemsize
    _check_fits(n, bits.nbytes + counts.nbytes + (inner + 1) * 4 + code_bytes + count_bytes)
    first_child = np.empty(inner + 1, np.int64)
    inner_codes = np.zeros(inner, code_dtype)
    first_child[0], first_child[inner] = 1, inner + n
    level_counts = []
    for level, rows in enumerate(starts, start=1):
        ids = slice(level_first[level - 1], level_first[level])
        below = starts[level] if level < levels - 1 else None
        first_child[ids] = (level_first[level] + np.searchsorted(below, rows)) if below is not None else inner + rows
        inner_codes[ids] = codes[rows, level - 1]
        per_shelf = np.empty((len(rows), s), count_types[level - 1])
        for shelf, row in enumerate(static):
            per_shelf[:, shelf] = np.add.reduceat(row, rows, dtype=np.int64)
        level_counts.append(jnp.asarray(per_shelf))
    return ItemTables(jnp.asarray(bits), jnp.asarray(counts), jnp.asarray(first_child.astype(np.int32)),
                      jnp.asarray(inner_codes), jnp.asarray(codes[:, -1].astype(code_dtype)), tuple(level_counts))

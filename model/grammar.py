"""The page grammar as a finite-state machine evaluated inside jit, as a mask over next tokens:

    PAGE -> (SHELF item{min..max})+ EOS,  at most `max_shelves` shelves, each shelf type at most once,
    no item twice, items eligible for their shelf, request exclusions and shelf allow-lists.

An item is one token (atomic item IDs) or a tuple of L code tokens (semantic IDs: code c of level l is
item token `level_offsets[l] + c`). Multi-token items are decoded along the trie of the catalog's code
tuples: with the items' rows sorted by code tuple, every trie node is a contiguous range of rows, so a
row's partial item is a range [lo, hi) and a code may follow only if its sub-range still holds an item
that is eligible for the shelf, unused and not excluded (counted with a prefix sum over the available
items). No dead end is ever entered: a started item can always be completed.

A page ends (EOS) once it has `max_shelves` shelves, or earlier only when no further shelf can be filled.
A shelf may only start when enough eligible, unused, non-excluded items remain to fill it to `min`,
so every path the mask allows ends in a valid page: an invalid page is impossible, not filtered.

Eligibility comes in two parts, so that nothing sent per request grows with the catalog:
`ItemTables.shelf_items` (S, N), which items each shelf holds for every request, lives on the device once
per checkpoint; what depends on the request (history-dependent shelves, exclusions) travels as short
index lists in `PageRules`. Each row counts the items still available on every shelf and updates the
counts as items are placed, so no step sums over shelves x items.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from homegen.data.vocab import EOS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ItemTables:
    """What decoding needs of the catalog, on the device once per checkpoint."""

    shelf_items: jax.Array  # (S, N) bool: the items every request may place on each shelf
    codes: jax.Array  # (N, L) int32: each item's code tuple, rows sorted by tuple (atomic: (N, 1) arange)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PageRules:
    """Per-request constraints (one row per request, or per beam once gathered). Index lists are padded
    with -1. Extra pairs are distinct and never repeat a pair of `shelf_items`; exclusions are distinct."""

    extra_items: jax.Array  # (R, E) int32: items eligible for this request beyond shelf_items ...
    extra_shelves: jax.Array  # (R, E) int32: ... and the shelf each of them may stand on
    excluded: jax.Array  # (R, X) int32: items the request excludes
    allowed_shelves: jax.Array  # (R, S) bool
    min_items: jax.Array  # (R,) int32
    max_items: jax.Array  # (R,) int32
    max_shelves: jax.Array  # (R,) int32

    def take(self, rows: jax.Array) -> PageRules:
        return jax.tree.map(lambda x: x[rows], self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PageState:
    """Where each row is in the grammar."""

    shelves: jax.Array  # (R,) shelves started
    items: jax.Array  # (R,) items completed in the current shelf
    current: jax.Array  # (R,) current shelf index, -1 before the first
    used_items: jax.Array  # (R, N) bool: placed or excluded
    used_shelves: jax.Array  # (R, S) bool
    remaining: jax.Array  # (R, S) int32: eligible items not yet placed or excluded, per shelf
    done: jax.Array  # (R,) bool: EOS emitted
    depth: jax.Array  # (R,) codes of the current item emitted so far (always 0 for atomic items)
    lo: jax.Array  # (R,) the item rows [lo, hi) whose code tuples start with those codes
    hi: jax.Array  # (R,)

    def take(self, rows: jax.Array) -> PageState:
        return jax.tree.map(lambda x: x[rows], self)


def _scatter(rows: int, width: int, index: jax.Array, where: jax.Array, dtype=bool) -> jax.Array:
    """(rows, width): per row, 1 (True) at index[row, j] wherever where[row, j]; counts add up for ints."""
    target = jnp.where(where, index, width)
    out = jnp.zeros((rows, width + 1), dtype)
    row = jnp.arange(rows)[:, None]
    out = out.at[row, target].set(True) if dtype == bool else out.at[row, target].add(1)
    return out[:, :width]


def _lower_bound(codes: jax.Array, level: jax.Array, lo: jax.Array, hi: jax.Array, targets: jax.Array) -> jax.Array:
    """(R, Q): per row, the first item row in [lo, hi) whose code at `level` is >= each target (hi if
    none), by bisection. Within a trie node's range the codes of the next level are sorted."""
    n = codes.shape[0]
    column = codes.T  # (L, N)
    level = level[:, None]
    lo = jnp.broadcast_to(lo[:, None], targets.shape)
    hi = jnp.broadcast_to(hi[:, None], targets.shape)

    def halve(_, bounds):
        lo, hi = bounds
        active = lo < hi
        mid = (lo + hi) // 2
        right = active & (column[level, jnp.minimum(mid, n - 1)] < targets)
        return jnp.where(right, mid + 1, lo), jnp.where(active & ~right, mid, hi)

    return jax.lax.fori_loop(0, max(1, int(np.ceil(np.log2(n + 1)))), halve, (lo, hi))[0]


@dataclasses.dataclass(frozen=True)
class PageGrammar:
    """Token-class layout of the vocabulary. `level_sizes` holds the codes per level of semantic item IDs
    (item tokens are `levels`-tuples); empty or one level means atomic items, one token per item."""

    vocab_size: int
    shelf_offset: int
    num_shelves: int
    item_offset: int
    num_items: int
    level_sizes: tuple[int, ...] = ()

    @classmethod
    def for_vocabulary(cls, vocab) -> PageGrammar:
        return cls(vocab.size, vocab.shelf_offset, len(vocab.shelves), vocab.item_offset, vocab.items.num_items,
                   tuple(vocab.items.level_sizes) if vocab.items.tokens_per_item > 1 else ())

    @property
    def levels(self) -> int:
        """Tokens per item."""
        return max(1, len(self.level_sizes))

    @property
    def level_offsets(self) -> tuple[int, ...]:
        """Item token of code 0 at each level, relative to `item_offset`."""
        return tuple(int(o) for o in np.cumsum((0,) + self.level_sizes[:-1])) if self.level_sizes else (0,)

    @property
    def item_tokens(self) -> int:
        """How many item tokens the vocabulary has."""
        return sum(self.level_sizes) if self.levels > 1 else self.num_items

    def tables(self, shelf_items, codes=None) -> ItemTables:
        """The device tables of a catalog: `shelf_items` (S, N) and, for semantic IDs, the (N, L) code table
        with rows in the items' order (sorted by code tuple)."""
        if codes is None:
            if self.levels > 1:
                raise ValueError("semantic item IDs need their code table")
            codes = np.arange(self.num_items, dtype=np.int32)[:, None]
        codes = jnp.asarray(codes, jnp.int32)
        if codes.shape != (self.num_items, self.levels):
            raise ValueError(f"code table of shape {codes.shape}, expected {(self.num_items, self.levels)}")
        return ItemTables(jnp.asarray(shelf_items, bool), codes)

    def init(self, rules: PageRules, tables: ItemTables) -> PageState:
        """The empty page of each row: exclusions count as used, and each shelf's eligible items are counted
        once (from the exclusions and extra pairs, not over the catalog)."""
        shelf_items = tables.shelf_items
        rows, n, s = rules.min_items.shape[0], self.num_items, self.num_shelves
        is_excluded = rules.excluded >= 0
        used = _scatter(rows, n, rules.excluded, is_excluded)
        excluded_on = shelf_items.T[jnp.maximum(rules.excluded, 0)] & is_excluded[..., None]  # (R, X, S)
        extra_ok = (rules.extra_items >= 0) & ~jnp.take_along_axis(used, jnp.maximum(rules.extra_items, 0), 1)
        remaining = (jnp.sum(shelf_items, axis=1, dtype=jnp.int32)[None] - jnp.sum(excluded_on, axis=1, dtype=jnp.int32)
                     + _scatter(rows, s, rules.extra_shelves, extra_ok, jnp.int32))
        zeros = jnp.zeros((rows,), jnp.int32)
        return PageState(zeros, zeros, zeros - 1, used, jnp.zeros((rows, s), bool), remaining,
                         jnp.zeros((rows,), bool), depth=zeros, lo=zeros, hi=zeros + n)

    def _code_mask(self, state: PageState, available: jax.Array, codes: jax.Array) -> jax.Array:
        """(R, item tokens) bool, semantic IDs: the codes at each row's depth whose sub-range of the trie
        still holds an available item."""
        width = max(self.level_sizes)
        level = jnp.minimum(state.depth, self.levels - 1)
        bounds = _lower_bound(codes, level, state.lo, state.hi, jnp.broadcast_to(jnp.arange(width + 1),
                                                                                  (level.shape[0], width + 1)))
        prefix = jnp.pad(jnp.cumsum(available, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))  # (R, N + 1)
        counts = jnp.diff(jnp.take_along_axis(prefix, bounds, axis=1), axis=1)  # (R, width)
        return jnp.concatenate([(level == l)[:, None] & (counts[:, :size] > 0)
                                for l, size in enumerate(self.level_sizes)], axis=1)

    def allowed(self, state: PageState, rules: PageRules, tables: ItemTables) -> jax.Array:
        """(R, V) bool: the tokens each row may emit next."""
        rows = state.shelves.shape[0]
        in_shelf = state.current >= 0
        mid_item = state.depth > 0
        extra_here = (rules.extra_items >= 0) & (rules.extra_shelves == state.current[:, None])
        on_current = tables.shelf_items[jnp.maximum(state.current, 0)] | _scatter(rows, self.num_items,
                                                                                  rules.extra_items, extra_here)
        available = on_current & ~state.used_items
        room = (in_shelf & (state.items < rules.max_items))[:, None]
        item_ok = room & (available if self.levels == 1 else self._code_mask(state, available, tables.codes))
        enough = state.remaining >= rules.min_items[:, None]
        can_close = in_shelf & (state.items >= rules.min_items) & ~mid_item
        may_open = ((state.shelves == 0) & ~state.done) | can_close
        startable = rules.allowed_shelves & ~state.used_shelves & enough
        more = (state.shelves < rules.max_shelves) & jnp.any(startable, axis=-1)
        shelf_ok = (may_open & (state.shelves < rules.max_shelves))[:, None] & startable
        eos_ok = (can_close & ~state.done & ~more) | state.done
        mask = jnp.zeros((rows, self.vocab_size), bool)
        mask = jax.lax.dynamic_update_slice(mask, shelf_ok, (0, self.shelf_offset))
        mask = jax.lax.dynamic_update_slice(mask, item_ok, (0, self.item_offset))
        return mask.at[:, EOS].set(eos_ok)

    def advance(self, state: PageState, token: jax.Array, rules: PageRules, tables: ItemTables) -> PageState:
        """The state after each row emits `token` (R,); a completed item leaves every shelf it was eligible
        for."""
        rows, n = token.shape[0], self.num_items
        shelf = token - self.shelf_offset
        is_shelf = (shelf >= 0) & (shelf < self.num_shelves)
        item_token = token - self.item_offset
        is_code = (item_token >= 0) & (item_token < self.item_tokens)
        depth, lo, hi = state.depth, state.lo, state.hi
        if self.levels == 1:
            completes, item = is_code, item_token
        else:
            level = jnp.minimum(depth, self.levels - 1)
            code = item_token - jnp.asarray(self.level_offsets, jnp.int32)[level]
            bounds = _lower_bound(tables.codes, level, lo, hi, jnp.stack([code, code + 1], axis=1))
            completes = is_code & (depth == self.levels - 1)
            partial = is_code & ~completes
            item = bounds[:, 0]
            depth = jnp.where(partial, depth + 1, jnp.where(is_code | is_shelf, 0, depth))
            lo, hi = jnp.where(partial, bounds[:, 0], 0), jnp.where(partial, bounds[:, 1], n)
        placed = completes[:, None] & (rules.extra_items == item[:, None])
        leaves = (tables.shelf_items[:, jnp.where(completes, item, 0)].T & completes[:, None]).astype(jnp.int32)
        leaves += _scatter(rows, self.num_shelves, rules.extra_shelves, placed, jnp.int32)
        return PageState(
            shelves=state.shelves + is_shelf,
            items=jnp.where(is_shelf, 0, state.items + completes),
            current=jnp.where(is_shelf, shelf, state.current),
            used_items=state.used_items | _scatter(rows, n, item[:, None], completes[:, None]),
            used_shelves=state.used_shelves | _scatter(rows, self.num_shelves, shelf[:, None], is_shelf[:, None]),
            remaining=state.remaining - leaves,
            done=state.done | (token == EOS),
            depth=depth, lo=lo, hi=hi)

    def max_length(self, max_shelves: int, max_items: int) -> int:
        """Longest page in tokens, EOS included."""
        return max_shelves * (max_items * self.levels + 1) + 1

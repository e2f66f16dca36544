"""The page grammar as a finite-state machine evaluated inside jit, as a mask over next tokens:

    PAGE -> (SHELF item{min..max})+ EOS,  at most `max_shelves` shelves, each shelf type at most once,
    no item twice, items eligible for their shelf, request exclusions and shelf allow-lists.

An item is one token (atomic item IDs) or a tuple of L code tokens (semantic IDs: code c of level l is
item token `level_offsets[l] + c`), decoded along the trie of the catalog's code tuples (`model/item_trie.py`):
a code may follow only if the child it leads to still holds an item that is eligible for the shelf, not
placed on this page and not excluded. That count is the child's per-shelf count, kept once per checkpoint,
corrected by the row's own short lists: the items this page placed (with the trie path each took), the
request's exclusions and its history-dependent (shelf, item) pairs, each located in the trie once per
request. So a decoding step reads one codebook's worth of children and those lists, never the catalog: no
row state grows with the catalog, and a beam reorder copies O(page length) per row. For atomic items the
children of the root are the whole catalog, so a step still reads O(N) (one shelf's eligibility bits, next
to the O(N) output layer), but no row state is O(N) either. No dead end is ever entered: a started item can
always be completed.

A page ends (EOS) once it has `max_shelves` shelves, or earlier only when no further shelf can be filled.
A shelf may only start when enough eligible, unplaced, non-excluded items remain to fill it to `min`,
so every path the mask allows ends in a valid page: an invalid page is impossible, not filtered.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from homegen.data.vocab import EOS
from homegen.model.item_trie import ItemTables, build_item_tables

__all__ = ["ItemTables", "PageGrammar", "PageRules", "PageState"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PageRules:
    """Per-request constraints (one row per request, or per beam once gathered), and the request's
    familiarity bonus (`boosted` items' logits raised by `boost`; a preference, not a rule: decoding applies
    it, the grammar ignores it). Index lists are padded with -1. Extra pairs are distinct and never repeat a
    pair the checkpoint's eligibility already admits; exclusions are distinct. `extra_paths` to `excluded_on`
    are derived from the others (the listed items' trie paths, which pairs survive the exclusions, which
    shelves admitted each excluded item); `PageGrammar.prepare` fills them once per batch (decoding does it
    before its loop)."""

    extra_items: jax.Array  # (R, E) int32: items eligible for this request beyond the checkpoint's ...
    extra_shelves: jax.Array  # (R, E) int32: ... and the shelf each of them may stand on
    excluded: jax.Array  # (R, X) int32: items the request excludes
    allowed_shelves: jax.Array  # (R, S) bool
    min_items: jax.Array  # (R,) int32
    max_items: jax.Array  # (R,) int32
    max_shelves: jax.Array  # (R,) int32
    extra_paths: jax.Array | None = None  # (R, E, L) trie node of each extra pair's item at levels 1..L
    extra_live: jax.Array | None = None  # (R, E) bool: a pair whose item is not excluded
    excluded_paths: jax.Array | None = None  # (R, X, L)
    excluded_on: jax.Array | None = None  # (R, X, S) bool: the shelves that admitted each excluded item
    boosted: jax.Array | None = None  # (R, H) int32: items (atomic IDs) whose logits are raised ...
    boost: jax.Array | None = None  # (R,) float32: ... by this much

    def take(self, rows: jax.Array) -> PageRules:
        return jax.tree.map(lambda x: x[rows], self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PageState:
    """Where each row is in the grammar; every field's size is set by the page, not the catalog."""

    shelves: jax.Array  # (R,) shelves started
    items: jax.Array  # (R,) items completed in the current shelf
    current: jax.Array  # (R,) current shelf index, -1 before the first
    used_shelves: jax.Array  # (R, S) bool
    remaining: jax.Array  # (R, S) int32: eligible items not yet placed or excluded, per shelf
    done: jax.Array  # (R,) bool: EOS emitted
    depth: jax.Array  # (R,) codes of the current item emitted so far (always 0 for atomic items)
    path: jax.Array  # (R, L) trie nodes of the item in progress at levels 1..depth
    placed: jax.Array  # (R,) items on the page so far
    placed_paths: jax.Array  # (R, T, L) trie path of each placed item (its leaf last)
    placed_on: jax.Array  # (R, T, S) bool: the shelves each placed item was eligible for

    def take(self, rows: jax.Array) -> PageState:
        return jax.tree.map(lambda x: x[rows], self)

    def filled_slots(self) -> jax.Array:
        """(R, T) bool: which slots of `placed_paths` / `placed_on` hold a placed item."""
        return jnp.arange(self.placed_paths.shape[1])[None] < self.placed[:, None]


def _scatter(rows: int, width: int, index: jax.Array, where: jax.Array) -> jax.Array:
    """(rows, width) bool: per row, True at index[row, j] wherever where[row, j]."""
    target = jnp.where(where, index, width)
    return jnp.zeros((rows, width + 1), bool).at[jnp.arange(rows)[:, None], target].set(True)[:, :width]


def _scatter_add(rows: int, width: int, index: jax.Array, values: jax.Array) -> jax.Array:
    """(rows, width) int32: per row, the sum of values[row, j] at index[row, j]; indices outside [0, width)
    are dropped."""
    target = jnp.where((index >= 0) & (index < width), index, width)
    out = jnp.zeros((rows, width + 1), jnp.int32).at[jnp.arange(rows)[:, None], target].add(values)
    return out[:, :width]


def _admits(shelf_bits: jax.Array, shelf: jax.Array, item: jax.Array) -> jax.Array:
    """Whether `shelf` admits `item` for every request (broadcast shapes), from the packed bits."""
    byte = shelf_bits[shelf, item >> 3]
    return ((byte >> (item & 7).astype(jnp.uint8)) & 1).astype(bool)


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

    @property
    def width(self) -> int:
        """Semantic IDs: the most children a trie node can have, the largest codebook."""
        return max(self.level_sizes)

    def tables(self, shelf_items, codes=None) -> ItemTables:
        """The device tables of a catalog (`model/item_trie.py`): `shelf_items` (S, N) bool and, for semantic
        IDs, the (N, L) code table with rows in the items' order (sorted by code tuple)."""
        if self.levels > 1 and codes is None:
            raise ValueError("semantic item IDs need their code table")
        if np.shape(shelf_items) != (self.num_shelves, self.num_items):
            raise ValueError(f"eligibility of shape {np.shape(shelf_items)}, expected "
                             f"{(self.num_shelves, self.num_items)}")
        if codes is not None and np.shape(codes) != (self.num_items, self.levels):
            raise ValueError(f"code table of shape {np.shape(codes)}, expected {(self.num_items, self.levels)}")
        return build_item_tables(shelf_items, codes if self.levels > 1 else None)

    def _paths(self, items: jax.Array, tables: ItemTables) -> jax.Array:
        """(..., L) the trie nodes of `items` (item rows; -1 gives some valid path) at levels 1..L, found from
        the leaf up by bisection over each level's first children (once per request, not per step)."""
        nodes = [tables.num_inner + jnp.maximum(items, 0)]
        starts = tables.level_starts
        for level in range(self.levels - 1, 0, -1):
            first = starts[level - 1]
            firsts = tables.first_child[first:first + tables.level_counts[level - 1].shape[0]]
            nodes.insert(0, first + jnp.searchsorted(firsts, nodes[0], side="right").astype(jnp.int32) - 1)
        return jnp.stack(nodes, axis=-1)

    def prepare(self, rules: PageRules, tables: ItemTables) -> PageRules:
        """`rules` with their listed items located in the trie (a no-op when already done)."""
        if rules.extra_paths is not None:
            return rules
        is_excluded = rules.excluded >= 0
        excluded_on = _admits(tables.shelf_bits, jnp.arange(self.num_shelves)[None, None],
                              jnp.maximum(rules.excluded, 0)[..., None]) & is_excluded[..., None]
        clash = (rules.extra_items[:, :, None] == rules.excluded[:, None, :]) & is_excluded[:, None, :]
        extra_live = (rules.extra_items >= 0) & ~jnp.any(clash, axis=-1)
        return dataclasses.replace(rules, extra_paths=self._paths(rules.extra_items, tables), extra_live=extra_live,
                                   excluded_paths=self._paths(rules.excluded, tables), excluded_on=excluded_on)

    def init(self, rules: PageRules, tables: ItemTables, max_new: int) -> PageState:
        """The empty page of each row, for pages of at most `max_new` tokens: each shelf's eligible items are
        counted once, from the checkpoint's counts less the exclusions plus the extra pairs."""
        rules = self.prepare(rules, tables)
        rows, s = rules.min_items.shape[0], self.num_shelves
        capacity = max(1, max_new // self.levels)
        remaining = (tables.shelf_counts[None] - jnp.sum(rules.excluded_on, axis=1, dtype=jnp.int32)
                     + _scatter_add(rows, s, rules.extra_shelves, rules.extra_live.astype(jnp.int32)))
        zeros = jnp.zeros((rows,), jnp.int32)
        return PageState(
            shelves=zeros, items=zeros, current=zeros - 1, used_shelves=jnp.zeros((rows, s), bool),
            remaining=remaining, done=jnp.zeros((rows,), bool), depth=zeros,
            path=jnp.zeros((rows, self.levels), jnp.int32), placed=zeros,
            placed_paths=jnp.full((rows, capacity, self.levels), -1, jnp.int32),
            placed_on=jnp.zeros((rows, capacity, s), bool))

    def _children(self, state: PageState, tables: ItemTables) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(first child (R,), its children's ids (R, W), which of the W slots are children (R, W)) of each
        row's current trie node: the root at an item's first code, else the node its codes so far lead to."""
        at = jnp.take_along_axis(state.path, jnp.maximum(state.depth - 1, 0)[:, None], axis=1)[:, 0]
        node = jnp.where(state.depth > 0, at, 0)
        first = tables.first_child[node]
        slots = jnp.arange(self.width, dtype=jnp.int32)
        return first, first[:, None] + slots, slots < (tables.first_child[node + 1] - first)[:, None]

    def _child_codes(self, children: jax.Array, depth: jax.Array, tables: ItemTables) -> jax.Array:
        """(R, W) the code of each child at its level (semantic IDs)."""
        leaf = tables.leaf_codes[jnp.clip(children - tables.num_inner, 0, self.num_items - 1)]
        inner = tables.inner_codes[jnp.clip(children, 0, tables.num_inner - 1)]
        return jnp.where((depth == self.levels - 1)[:, None], leaf, inner).astype(jnp.int32)

    def _open_items(self, state: PageState, rules: PageRules, tables: ItemTables) -> jax.Array:
        """(R, N) bool, atomic items: the current shelf's bits, plus the row's extra pairs on it, less its
        placed and excluded items (the one O(N) pass, beside the O(N) output layer)."""
        rows, n = state.depth.shape[0], self.num_items
        row = jnp.arange(rows)[:, None]
        open_items = jnp.unpackbits(tables.shelf_bits[jnp.maximum(state.current, 0)], axis=1, count=n,
                                    bitorder="little").astype(bool)
        extra_here = rules.extra_live & (rules.extra_shelves == state.current[:, None])
        open_items = open_items.at[row, jnp.where(extra_here, rules.extra_items, n)].set(True, mode="drop")
        taken = jnp.concatenate([jnp.where(state.filled_slots(), state.placed_paths[:, :, 0] - tables.num_inner, n),
                                 jnp.where(rules.excluded >= 0, rules.excluded, n)], axis=1)
        return open_items.at[row, taken].set(False, mode="drop")

    def _child_counts(self, state: PageState, rules: PageRules, tables: ItemTables, first: jax.Array,
                      children: jax.Array, is_child: jax.Array) -> jax.Array:
        """(R, W) int32, semantic IDs: the items under each child that the current shelf admits, not placed,
        not excluded: the checkpoint's count, less the row's placed and excluded items under it, plus its
        extra pairs."""
        rows, shelf = state.depth.shape[0], jnp.maximum(state.current, 0)
        leaf = jnp.clip(children - tables.num_inner, 0, self.num_items - 1)
        static = _admits(tables.shelf_bits, shelf[:, None], leaf).astype(jnp.int32)
        level = state.depth + 1  # the children's level
        for number, (start, counts) in enumerate(zip(tables.level_starts, tables.level_counts), start=1):
            index = jnp.clip(children - start, 0, counts.shape[0] - 1)
            static = jnp.where((level == number)[:, None], counts[index, shelf[:, None]].astype(jnp.int32), static)
        on_shelf = lambda on: jnp.take_along_axis(on, shelf[:, None, None], axis=2)[..., 0]  # noqa: E731
        paths = jnp.concatenate([state.placed_paths, rules.excluded_paths, rules.extra_paths], axis=1)
        weights = jnp.concatenate([-(state.filled_slots() & on_shelf(state.placed_on)).astype(jnp.int32),
                                   -on_shelf(rules.excluded_on).astype(jnp.int32),
                                   (rules.extra_live & (rules.extra_shelves == state.current[:, None])).astype(jnp.int32)],
                                  axis=1)
        under = jnp.take_along_axis(paths, state.depth[:, None, None], axis=2)[..., 0]  # node at the children's level
        return jnp.where(is_child, static + _scatter_add(rows, self.width, under - first[:, None], weights), 0)

    def allowed(self, state: PageState, rules: PageRules, tables: ItemTables) -> jax.Array:
        """(R, V) bool: the tokens each row may emit next."""
        rules = self.prepare(rules, tables)
        rows, capacity = state.shelves.shape[0], state.placed_paths.shape[1]
        in_shelf = state.current >= 0
        mid_item = state.depth > 0
        room = (in_shelf & (state.items < rules.max_items) & (state.placed < capacity))[:, None]
        if self.levels == 1:
            item_ok = room & self._open_items(state, rules, tables)
        else:
            first, children, is_child = self._children(state, tables)
            open_child = self._child_counts(state, rules, tables, first, children, is_child) > 0
            by_code = _scatter(rows, self.width, self._child_codes(children, state.depth, tables), open_child)
            item_ok = room & jnp.concatenate([(state.depth == l)[:, None] & by_code[:, :size]
                                              for l, size in enumerate(self.level_sizes)], axis=1)
        enough = (state.remaining >= rules.min_items[:, None]) & (capacity - state.placed >= rules.min_items)[:, None]
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

    def _shelves_of(self, item: jax.Array, rules: PageRules, tables: ItemTables) -> jax.Array:
        """(R, S) bool: the shelves each row's `item` is eligible for (the checkpoint's and the extra pairs)."""
        static = _admits(tables.shelf_bits, jnp.arange(self.num_shelves)[None], item[:, None])
        extra = rules.extra_live & (rules.extra_items == item[:, None])
        return static | _scatter(item.shape[0], self.num_shelves, rules.extra_shelves, extra)

    def advance(self, state: PageState, token: jax.Array, rules: PageRules, tables: ItemTables) -> PageState:
        """The state after each row emits `token` (R,); a completed item leaves every shelf it was eligible
        for and joins the page's placed items with its trie path."""
        rules = self.prepare(rules, tables)
        rows = token.shape[0]
        row = jnp.arange(rows)
        shelf = token - self.shelf_offset
        is_shelf = (shelf >= 0) & (shelf < self.num_shelves)
        item_token = token - self.item_offset
        is_code = (item_token >= 0) & (item_token < self.item_tokens)
        if self.levels == 1:
            child = tables.num_inner + item_token
        else:
            first, children, is_child = self._children(state, tables)
            code = item_token - jnp.asarray(self.level_offsets, jnp.int32)[state.depth]
            match = is_child & (self._child_codes(children, state.depth, tables) == code[:, None])
            child = first + jnp.argmax(match, axis=1).astype(jnp.int32)
        path = state.path.at[row, state.depth].set(jnp.where(is_code, child, state.path[row, state.depth]))
        completes = is_code & (state.depth == self.levels - 1)
        on = self._shelves_of(child - tables.num_inner, rules, tables) & completes[:, None]
        slot = jnp.minimum(state.placed, state.placed_paths.shape[1] - 1)
        keep = lambda new, old: jnp.where(completes.reshape((rows,) + (1,) * (old.ndim - 1)), new, old)  # noqa: E731
        return PageState(
            shelves=state.shelves + is_shelf,
            items=jnp.where(is_shelf, 0, state.items + completes),
            current=jnp.where(is_shelf, shelf, state.current),
            used_shelves=state.used_shelves | _scatter(rows, self.num_shelves, shelf[:, None], is_shelf[:, None]),
            remaining=state.remaining - on.astype(jnp.int32),
            done=state.done | (token == EOS),
            depth=jnp.where(is_code & ~completes, state.depth + 1, jnp.where(is_code | is_shelf, 0, state.depth)),
            path=path, placed=state.placed + completes,
            placed_paths=state.placed_paths.at[row, slot].set(keep(path, state.placed_paths[row, slot])),
            placed_on=state.placed_on.at[row, slot].set(keep(on, state.placed_on[row, slot])))

    def max_length(self, max_shelves: int, max_items: int) -> int:
        """Longest page in tokens, EOS included."""
        return max_shelves * (max_items * self.levels + 1) + 1

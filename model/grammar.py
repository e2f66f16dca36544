"""The page grammar as a finite-state machine evaluated inside jit, as a mask over next tokens:

    PAGE -> (SHELF item{min..max})+ EOS,  at most `max_shelves` shelves, each shelf type at most once,
    no item twice, items eligible for their shelf, request exclusions and shelf allow-lists.

A page ends (EOS) once it has `max_shelves` shelves, or earlier only when no further shelf can be filled.

A shelf may only start when enough eligible, unused, non-excluded items remain to fill it to `min`,
so every path the mask allows ends in a valid page: an invalid page is impossible, not filtered.

Eligibility comes in two parts, so that nothing sent per request grows with the catalog:
`shelf_items` (S, N), which items each shelf holds for every request, lives on the device once per
checkpoint; what depends on the request (history-dependent shelves, exclusions) travels as short index
lists in `PageRules`. Each row counts the items still available on every shelf and updates the counts as
items are placed, so no step sums over shelves x items.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from homegen.data.vocab import EOS


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
    items: jax.Array  # (R,) items in the current shelf
    current: jax.Array  # (R,) current shelf index, -1 before the first
    used_items: jax.Array  # (R, N) bool: placed or excluded
    used_shelves: jax.Array  # (R, S) bool
    remaining: jax.Array  # (R, S) int32: eligible items not yet placed or excluded, per shelf
    done: jax.Array  # (R,) bool: EOS emitted

    def take(self, rows: jax.Array) -> PageState:
        return jax.tree.map(lambda x: x[rows], self)


def _scatter(rows: int, width: int, index: jax.Array, where: jax.Array, dtype=bool) -> jax.Array:
    """(rows, width): per row, 1 (True) at index[row, j] wherever where[row, j]; counts add up for ints."""
    target = jnp.where(where, index, width)
    out = jnp.zeros((rows, width + 1), dtype)
    row = jnp.arange(rows)[:, None]
    out = out.at[row, target].set(True) if dtype == bool else out.at[row, target].add(1)
    return out[:, :width]


@dataclasses.dataclass(frozen=True)
class PageGrammar:
    """Token-class layout of the vocabulary (atomic items: one token per item)."""

    vocab_size: int
    shelf_offset: int
    num_shelves: int
    item_offset: int
    num_items: int

    @classmethod
    def for_vocabulary(cls, vocab) -> PageGrammar:
        if vocab.items.tokens_per_item != 1:
            raise NotImplementedError("constrained decoding needs one token per item")
        return cls(vocab.size, vocab.shelf_offset, len(vocab.shelves), vocab.item_offset, vocab.items.num_tokens)

    def init(self, rules: PageRules, shelf_items: jax.Array) -> PageState:
        """The empty page of each row: exclusions count as used, and each shelf's eligible items are counted
        once (from the exclusions and extra pairs, not over the catalog)."""
        rows, n, s = rules.min_items.shape[0], self.num_items, self.num_shelves
        is_excluded = rules.excluded >= 0
        used = _scatter(rows, n, rules.excluded, is_excluded)
        excluded_on = shelf_items.T[jnp.maximum(rules.excluded, 0)] & is_excluded[..., None]  # (R, X, S)
        extra_ok = (rules.extra_items >= 0) & ~jnp.take_along_axis(used, jnp.maximum(rules.extra_items, 0), 1)
        remaining = (jnp.sum(shelf_items, axis=1, dtype=jnp.int32)[None] - jnp.sum(excluded_on, axis=1, dtype=jnp.int32)
                     + _scatter(rows, s, rules.extra_shelves, extra_ok, jnp.int32))
        zeros = jnp.zeros((rows,), jnp.int32)
        return PageState(zeros, zeros, zeros - 1, used, jnp.zeros((rows, s), bool), remaining, jnp.zeros((rows,), bool))

    def allowed(self, state: PageState, rules: PageRules, shelf_items: jax.Array) -> jax.Array:
        """(R, V) bool: the tokens each row may emit next."""
        rows = state.shelves.shape[0]
        in_shelf = state.current >= 0
        extra_here = (rules.extra_items >= 0) & (rules.extra_shelves == state.current[:, None])
        on_current = shelf_items[jnp.maximum(state.current, 0)] | _scatter(rows, self.num_items, rules.extra_items,
                                                                           extra_here)
        item_ok = (in_shelf & (state.items < rules.max_items))[:, None] & on_current & ~state.used_items
        enough = state.remaining >= rules.min_items[:, None]
        can_close = in_shelf & (state.items >= rules.min_items)
        may_open = ((state.shelves == 0) & ~state.done) | can_close
        startable = rules.allowed_shelves & ~state.used_shelves & enough
        more = (state.shelves < rules.max_shelves) & jnp.any(startable, axis=-1)
        shelf_ok = (may_open & (state.shelves < rules.max_shelves))[:, None] & startable
        eos_ok = (can_close & ~state.done & ~more) | state.done
        mask = jnp.zeros((rows, self.vocab_size), bool)
        mask = jax.lax.dynamic_update_slice(mask, shelf_ok, (0, self.shelf_offset))
        mask = jax.lax.dynamic_update_slice(mask, item_ok, (0, self.item_offset))
        return mask.at[:, EOS].set(eos_ok)

    def advance(self, state: PageState, token: jax.Array, rules: PageRules, shelf_items: jax.Array) -> PageState:
        """The state after each row emits `token` (R,); a placed item leaves every shelf it was eligible for."""
        rows = token.shape[0]
        shelf = token - self.shelf_offset
        item = token - self.item_offset
        is_shelf = (shelf >= 0) & (shelf < self.num_shelves)
        is_item = (item >= 0) & (item < self.num_items)
        placed = is_item[:, None] & (rules.extra_items == item[:, None])
        leaves = (shelf_items[:, jnp.where(is_item, item, 0)].T & is_item[:, None]).astype(jnp.int32)
        leaves += _scatter(rows, self.num_shelves, rules.extra_shelves, placed, jnp.int32)
        return PageState(
            shelves=state.shelves + is_shelf,
            items=jnp.where(is_shelf, 0, state.items + is_item),
            current=jnp.where(is_shelf, shelf, state.current),
            used_items=state.used_items | _scatter(rows, self.num_items, item[:, None], is_item[:, None]),
            used_shelves=state.used_shelves | _scatter(rows, self.num_shelves, shelf[:, None], is_shelf[:, None]),
            remaining=state.remaining - leaves,
            done=state.done | (token == EOS))

    def max_length(self, max_shelves: int, max_items: int) -> int:
        """Longest page in tokens, EOS included."""
        return max_shelves * (max_items + 1) + 1

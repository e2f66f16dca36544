"""The page grammar as a finite-state machine evaluated inside jit, as a mask over next tokens:

    PAGE -> (SHELF item{min..max})+ EOS,  at most `max_shelves` shelves, each shelf type at most once,
    no item twice, items eligible for their shelf, request exclusions and shelf allow-lists.

A page ends (EOS) once it has `max_shelves` shelves, or earlier only when no further shelf can be filled.

A shelf may only start when enough eligible, unused, non-excluded items remain to fill it to `min`,
so every path the mask allows ends in a valid page: an invalid page is impossible, not filtered.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from homegen.data.vocab import EOS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PageRules:
    """Per-request constraints (one row per request, or per beam once gathered)."""

    eligible: jax.Array  # (R, S, N) bool: item n may stand on shelf s
    allowed_shelves: jax.Array  # (R, S) bool
    excluded: jax.Array  # (R, N) bool
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
    used_items: jax.Array  # (R, N) bool
    used_shelves: jax.Array  # (R, S) bool
    done: jax.Array  # (R,) bool: EOS emitted

    def take(self, rows: jax.Array) -> PageState:
        return jax.tree.map(lambda x: x[rows], self)


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

    def init(self, rows: int) -> PageState:
        zeros = jnp.zeros((rows,), jnp.int32)
        return PageState(zeros, zeros, zeros - 1, jnp.zeros((rows, self.num_items), bool),
                         jnp.zeros((rows, self.num_shelves), bool), jnp.zeros((rows,), bool))

    def allowed(self, state: PageState, rules: PageRules) -> jax.Array:
        """(R, V) bool: the tokens each row may emit next."""
        in_shelf = state.current >= 0
        available = ~state.used_items & ~rules.excluded
        current = jnp.take_along_axis(rules.eligible, jnp.maximum(state.current, 0)[:, None, None], axis=1)[:, 0]
        item_ok = (in_shelf & (state.items < rules.max_items))[:, None] & current & available
        enough = jnp.sum(rules.eligible & available[:, None, :], axis=-1) >= rules.min_items[:, None]
        can_close = in_shelf & (state.items >= rules.min_items)
        may_open = ((state.shelves == 0) & ~state.done) | can_close
        startable = rules.allowed_shelves & ~state.used_shelves & enough
        more = (state.shelves < rules.max_shelves) & jnp.any(startable, axis=-1)
        shelf_ok = (may_open & (state.shelves < rules.max_shelves))[:, None] & startable
        eos_ok = (can_close & ~state.done & ~more) | state.done
        rows = state.shelves.shape[0]
        mask = jnp.zeros((rows, self.vocab_size), bool)
        mask = jax.lax.dynamic_update_slice(mask, shelf_ok, (0, self.shelf_offset))
        mask = jax.lax.dynamic_update_slice(mask, item_ok, (0, self.item_offset))
        return mask.at[:, EOS].set(eos_ok)

    def advance(self, state: PageState, token: jax.Array) -> PageState:
        shelf = token - self.shelf_offset
        item = token - self.item_offset
        is_shelf = (shelf >= 0) & (shelf < self.num_shelves)
        is_item = (item >= 0) & (item < self.num_items)
        return PageState(
            shelves=state.shelves + is_shelf,
            items=jnp.where(is_shelf, 0, state.items + is_item),
            current=jnp.where(is_shelf, shelf, state.current),
            used_items=state.used_items | (is_item[:, None] & (jnp.arange(self.num_items) == item[:, None])),
            used_shelves=state.used_shelves | (is_shelf[:, None] & (jnp.arange(self.num_shelves) == shelf[:, None])),
            done=state.done | (token == EOS))

    def max_length(self, max_shelves: int, max_items: int) -> int:
        """Longest page in tokens, EOS included."""
        return max_shelves * (max_items + 1) + 1

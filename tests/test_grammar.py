"""The grammar's catalog-independent masks: along random walks over random catalogs (semantic IDs of 2-4
levels, random eligibility, history-dependent pairs, exclusions, allow-lists, page shapes) the mask equals a
reference recomputed from scratch in numpy over the whole catalog at every step, and every walk ends in EOS;
the decoding step's computation holds no array whose size follows the catalog; bad tables are refused."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from homegen.data.vocab import EOS
from homegen.model.grammar import PageGrammar, PageRules

SHELF_OFFSET = 5


def semantic_grammar(codes: np.ndarray, shelves: int) -> PageGrammar:
    sizes = tuple(int(m) + 1 for m in codes.max(axis=0))
    item_offset = SHELF_OFFSET + shelves
    return PageGrammar(vocab_size=item_offset + sum(sizes), shelf_offset=SHELF_OFFSET, num_shelves=shelves,
                       item_offset=item_offset, num_items=len(codes), level_sizes=sizes)


def random_codes(rng: np.random.Generator, items: int, sizes: tuple[int, ...]) -> np.ndarray:
    """`items` distinct code tuples within `sizes`, sorted, with the largest code of every level used."""
    every = np.stack(np.meshgrid(*(np.arange(s) for s in sizes), indexing="ij"), -1).reshape(-1, len(sizes))
    chosen = every[np.r_[len(every) - 1, rng.choice(len(every) - 1, items - 1, replace=False)]]
    return chosen[np.lexsort(chosen.T[::-1])].astype(np.int32)


def reference_mask(tokens: list[int], grammar: PageGrammar, codes: np.ndarray, eligible: np.ndarray, excluded: set,
                   allowed_shelves: np.ndarray, min_items: int, max_items: int, max_shelves: int) -> np.ndarray:
    """The mask after `tokens`, from the dense (S, N) eligibility and the whole code table."""
    shelves, items, current, done, partial = 0, 0, -1, False, []
    used, used_shelves = set(excluded), set()
    offsets = grammar.level_offsets
    for t in tokens:
        done |= t == EOS
        if grammar.shelf_offset <= t < grammar.shelf_offset + grammar.num_shelves:
            shelves, items, current = shelves + 1, 0, t - grammar.shelf_offset
            used_shelves.add(current)
        elif t >= grammar.item_offset:
            partial.append(t - grammar.item_offset - offsets[len(partial)])
            if len(partial) == grammar.levels:
                used.add(int(np.flatnonzero((codes == partial).all(axis=1))[0]))
                items, partial = items + 1, []
    available = np.array([k not in used for k in range(grammar.num_items)])
    mask = np.zeros(grammar.vocab_size, bool)
    d = len(partial)
    if current >= 0 and items < max_items:
        under = (codes[:, :d] == partial).all(axis=1) & eligible[current] & available
        mask[grammar.item_offset + offsets[d] + np.unique(codes[under, d])] = True
    enough = (eligible & available).sum(axis=1) >= min_items
    startable = np.array([allowed_shelves[s] and s not in used_shelves and enough[s]
                          for s in range(grammar.num_shelves)])
    can_close = current >= 0 and items >= min_items and not partial
    if ((shelves == 0 and not done) or can_close) and shelves < max_shelves:
        mask[grammar.shelf_offset + np.flatnonzero(startable)] = True
    more = shelves < max_shelves and startable.any()
    mask[EOS] = (can_close and not done and not more) or done
    return mask


def padded(values: list[int], width: int) -> np.ndarray:
    return np.array(list(values) + [-1] * (width - len(values)), np.int32)[None]


def test_semantic_masks_equal_the_dense_reference_along_random_walks():
    rng = np.random.default_rng(1)
    walks = 0
    for trial in range(10):
        levels = 2 + trial % 3
        sizes = tuple(int(x) for x in rng.integers(2, 6, levels))
        n = int(rng.integers(min(8, int(np.prod(sizes))), min(60, int(np.prod(sizes))) + 1))
        codes = random_codes(rng, n, sizes)
        s = int(rng.integers(2, 5))
        grammar = semantic_grammar(codes, s)
        static = rng.random((s, n)) < rng.uniform(0.1, 0.7)
        static[rng.integers(s)] = False  # a history-dependent shelf: only extra pairs
        extra = [(sh, k) for sh in range(s) for k in range(n) if not static[sh, k] and rng.random() < 0.2]
        excluded = sorted(set(rng.integers(0, n, rng.integers(0, 6)).tolist()))
        eligible = static.copy()
        for sh, k in extra:
            eligible[sh, k] = True
        allowed_shelves = rng.random(s) < 0.8
        min_items, max_items = int(rng.integers(1, 3)), int(rng.integers(2, 5))
        max_shelves = int(rng.integers(1, s + 1))
        width = len(extra) + 8
        rules = PageRules(jnp.asarray(padded([k for _, k in extra], width)),
                          jnp.asarray(padded([sh for sh, _ in extra], width)), jnp.asarray(padded(excluded, width)),
                          jnp.asarray(allowed_shelves[None]), jnp.array([min_items]), jnp.array([max_items]),
                          jnp.array([max_shelves]))
        tables = grammar.tables(static, codes)
        rules = grammar.prepare(rules, tables)
        allowed = jax.jit(lambda state: grammar.allowed(state, rules, tables))  # noqa: B023
        advance = jax.jit(lambda state, token: grammar.advance(state, token, rules, tables))  # noqa: B023
        for _ in range(3):  # walks per compiled catalog
            state, tokens = grammar.init(rules, tables, grammar.max_length(max_shelves, max_items)), []
            for _ in range(grammar.max_length(max_shelves, max_items)):
                mask = np.asarray(allowed(state))[0]
                expected = reference_mask(tokens, grammar, codes, eligible, set(excluded), allowed_shelves,
                                          min_items, max_items, max_shelves)
                np.testing.assert_array_equal(mask, expected, err_msg=f"trial {trial}, after {tokens}")
                if not tokens and not mask.any():
                    break  # no page meets this request (the engine refuses such a request before decoding)
                assert mask.any(), f"dead end after {tokens}"
                if tokens and tokens[-1] == EOS:
                    break
                token = int(rng.choice(np.flatnonzero(mask)))
                tokens.append(token)
                state = advance(state, jnp.array([token]))
            assert not tokens or tokens[-1] == EOS, tokens  # a started page always ends
            walks += bool(tokens)
    assert walks >= 24


def step_shapes(items: int, seed: int = 0) -> list[tuple]:
    """The shapes of every value the decoding step (`allowed`, then `advance`) computes, for a catalog of
    `items` semantic IDs within (16, 16, 16, 16) codes, the catalog's own tables aside."""
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, items, (16, 16, 16, 16))
    grammar = semantic_grammar(codes, shelves=6)
    tables = grammar.tables(rng.random((6, items)) < 0.3, codes)
    rows = 8
    rules = PageRules(jnp.asarray(np.tile(padded([1, 2, 3], 16), (rows, 1))),
                      jnp.asarray(np.tile(padded([0, 0, 1], 16), (rows, 1))),
                      jnp.asarray(np.tile(padded([4, 5], 16), (rows, 1))), jnp.ones((rows, 6), bool),
                      jnp.ones((rows,), jnp.int32), jnp.full((rows,), 5, jnp.int32), jnp.full((rows,), 4, jnp.int32))
    rules = grammar.prepare(rules, tables)
    state = grammar.init(rules, tables, grammar.max_length(4, 5))

    def step(state, rules, tables):
        mask = grammar.allowed(state, rules, tables)
        return grammar.advance(state, jnp.argmax(mask, axis=1).astype(jnp.int32), rules, tables)

    jaxpr = jax.make_jaxpr(step)(state, rules, tables)
    table_shapes = {tuple(x.shape) for x in jax.tree.leaves(tables)}
    shapes = []

    def visit(inner):
        for eqn in inner.eqns:
            shapes.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    grown = [shape for shape in shapes if shape in table_shapes and max(shape, default=0) > 64]
    assert not grown, f"the step computes catalog-sized arrays {grown}"
    return sorted(shapes)


def test_the_decoding_step_holds_nothing_that_grows_with_the_catalog():
    """Semantic IDs: the step's computation at 1,000 and at 30,000 items has exactly the same shapes (its
    tables are inputs, read by gathers of one codebook's children and the rows' own lists)."""
    assert step_shapes(1_000) == step_shapes(30_000)


def test_bad_tables_are_refused():
    grammar = semantic_grammar(np.array([[0, 0], [0, 1], [1, 0]]), shelves=2)
    with pytest.raises(ValueError, match="sorted"):
        grammar.tables(np.ones((2, 3), bool), np.array([[0, 1], [0, 0], [1, 0]]))
    with pytest.raises(ValueError, match="sorted"):
        grammar.tables(np.ones((2, 3), bool), np.array([[0, 0], [0, 0], [1, 0]]))
    with pytest.raises(ValueError, match="eligibility of shape"):
        grammar.tables(np.ones((3, 3), bool), np.array([[0, 0], [0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="code table"):
        grammar.tables(np.ones((2, 3), bool))


def test_tables_larger_than_the_device_are_a_one_line_error(monkeypatch):
    import homegen.model.item_trie as item_trie

    codes = random_codes(np.random.default_rng(0), 500, (8, 8, 8, 8))
    grammar = semantic_grammar(codes, shelves=4)
    needed = grammar.tables(np.ones((4, 500), bool), codes).nbytes()
    monkeypatch.setattr(item_trie, "device_memory_free", lambda: needed - 1)
    with pytest.raises(ValueError, match=r"decoding tables of 500 items need .* GiB on the device, more than"):
        grammar.tables(np.ones((4, 500), bool), codes)
    monkeypatch.setattr(item_trie, "device_memory_free", lambda: needed)
    assert grammar.tables(np.ones((4, 500), bool), codes).nbytes() == needed

"""Semantic item IDs: residual k-means codes, the tokenizer, the trie, and trie-constrained beam search
against brute-force enumeration."""

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from homegen.data.semantic_catalog import build_semantic_items
from homegen.data.semantic_ids import (
    SemanticItems,
    cooccurrence_features,
    item_trie,
    kmeans,
    residual_codes,
)
from homegen.data.vocab import AtomicItems, item_tokenizer_from_json
from homegen.model.decoding import constrained_logp, item_beam_search
from homegen.model.transformer import Transformer, TransformerConfig


def test_kmeans_separates_clear_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[5.0, 0], [-5, 0], [0, 5]])
    x = np.concatenate([c + 0.1 * rng.standard_normal((40, 2)) for c in centers]).astype(np.float32)
    _, assign = kmeans(x, 3)
    groups = assign.reshape(3, 40)
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3


def test_residual_codes_are_unique_tuples_with_collision_numbers():
    rng = np.random.default_rng(1)
    emb = np.repeat(rng.standard_normal((5, 8)), 4, axis=0).astype(np.float32)  # 5 groups of 4 identical items
    codes = residual_codes(emb, levels=2, codes=8)
    assert codes.shape == (20, 3)
    assert len({tuple(r) for r in codes}) == 20
    # Identical items share the quantised prefix and are told apart by the collision code 0..3.
    for g in range(5):
        block = codes[4 * g:4 * g + 4]
        assert len({tuple(r) for r in block[:, :2]}) == 1
        assert sorted(block[:, 2]) == [0, 1, 2, 3]


def test_cooccurring_items_share_first_code():
    # Two communities of items that never co-occur: the first level must split them.
    a, b = [f"a{i}" for i in range(20)], [f"b{i}" for i in range(20)]
    rng = np.random.default_rng(2)
    sequences = [list(rng.choice(group, 8, replace=False)) for group in (a, b) for _ in range(200)]
    items = build_semantic_items(a + b, sequences, levels=2, codes=2, dim=8)
    first = items.code_table()[:, 0]
    assert len(set(first[:20])) == 1 and len(set(first[20:])) == 1 and first[0] != first[20]


def test_given_embeddings_are_quantised_by_direction():
    # Two directions, each item at its own length: the codes follow direction, not length, and the data's
    # sequences and attributes are not used.
    rng = np.random.default_rng(3)
    directions = np.eye(8, dtype=np.float32)[[0, 5]]
    embeddings = np.concatenate([directions[g] * rng.uniform(0.1, 10, (15, 1)) + 0.01 * rng.normal(size=(15, 8))
                                 for g in (0, 1)])
    ids = [f"i{k}" for k in range(30)]
    items = build_semantic_items(ids, [["i0", "i29"]] * 50, {"i0": ["x"]}, levels=2, codes=2, embeddings=embeddings)
    first = np.array([items.encode(i)[0] for i in ids])
    assert len(set(first[:15])) == 1 and len(set(first[15:])) == 1 and first[0] != first[15]
    assert items.encoder is None
    with pytest.raises(ValueError, match=r"\(items, dim\) for 30 items"):
        build_semantic_items(ids, [], embeddings=embeddings[:29])
    with pytest.raises(ValueError, match="zero or non-finite row"):
        build_semantic_items(ids, [], embeddings=np.where(np.arange(30)[:, None] == 4, 0.0, embeddings))


def test_cooccurrence_pmi_is_symmetric_and_windowed():
    pmi = cooccurrence_features([[0, 1, 2, 3]], 5, window=1).toarray()
    np.testing.assert_allclose(pmi, pmi.T)
    assert pmi[0, 2] == 0 and pmi[4].sum() == 0 and pmi[0, 1] > 0


def test_semantic_tokenizer_round_trip_and_json():
    codes = np.array([[0, 1, 0], [0, 1, 1], [2, 0, 0]])
    items = SemanticItems(["x", "y", "z"], codes)
    assert items.level_sizes == [3, 2, 2] and items.level_offsets == [0, 3, 5] and items.num_tokens == 7
    assert items.encode("y") == (0, 4, 6) and items.decode((0, 4, 6)) == "y"
    assert items.encode("nope") is None and items.decode((0, 4, 5)) == "x" and items.decode((2, 3, 6)) is None
    saved = items.to_json()
    assert isinstance(saved["codes"], dict)  # base64, not a list per item
    again = item_tokenizer_from_json(json.loads(json.dumps(saved)))
    assert [again.encode(i) for i in "xyz"] == [items.encode(i) for i in "xyz"]
    older = item_tokenizer_from_json({**saved, "codes": items.codes.tolist()})  # checkpoints before the change
    np.testing.assert_array_equal(older.codes, items.codes)
    with pytest.raises(ValueError, match="share a code tuple"):
        SemanticItems(["x", "y"], np.array([[0, 1], [0, 1]]))


def walk(children, codes):
    """The item a code tuple reaches in the trie, or -1."""
    node = 0
    for c in codes:
        if node < 0 or c >= children.shape[1]:
            return -1
        node = int(children[node, c])
    return node


def test_new_items_are_coded_from_their_metadata():
    """Items first seen after training get codes from their attributes alone: a new item with an existing
    item's metadata gets that item's prefix, every new tuple is new and within the level sizes (so the token
    layout is unchanged), full prefixes spill to the nearest open one, and the encoder survives JSON."""
    rng = np.random.default_rng(0)
    ids = [f"t{k}" for k in range(400)]
    attributes = {i: [f"artist=a{k % 40}", f"genre=g{k % 6}", f"released=2025-{k % 12 + 1:02d}"]
                  for k, i in enumerate(ids)}
    items = build_semantic_items(ids, [], attributes, levels=2, codes=8, dim=16)
    twins = ["t5", "t77", "t123"]
    new = items.add([f"new_{t}" for t in twins] + ["unknown_artist", "t9"],
                    [attributes[t] for t in twins] + [["artist=nobody"], attributes["t9"]])
    assert new.num_items == 404 and new.level_sizes == items.level_sizes and new.num_tokens == items.num_tokens
    for t in twins:
        assert new.encode(f"new_{t}")[:2] == items.encode(t)[:2]
    assert new.encode("t9") == items.encode("t9")  # known items keep their codes
    assert len({tuple(row) for row in new.code_table()}) == 404
    assert (new.code_table() < np.array(new.level_sizes)).all()
    # 60 copies of one item's metadata: more than its prefix has collision codes, so some spill over.
    crowd = items.add([f"c{k}" for k in range(60)], [attributes["t5"]] * 60)
    codes = np.array([crowd.encode(f"c{k}") for k in range(60)])
    assert len({tuple(c) for c in codes}) == 60 and len({tuple(c[:2]) for c in codes}) > 1
    back = item_tokenizer_from_json(json.loads(json.dumps(new.to_json())))
    assert back.add(["x"], [attributes["t5"]]).encode("x") == new.add(["x"], [attributes["t5"]]).encode("x")
    with pytest.raises(ValueError, match="without item metadata"):
        build_semantic_items(ids, [list(rng.choice(ids, 10)) for _ in range(50)], None, levels=2, codes=8).add(
            ["x"], [["artist=a1"]])


def test_trie_walks_to_every_item_and_nowhere_else():
    codes = np.array([[0, 1, 0], [0, 1, 1], [2, 0, 0], [1, 1, 0]])
    children = item_trie(codes)
    for combo in itertools.product(range(3), repeat=3):
        matches = [k for k, row in enumerate(codes) if tuple(row) == combo]
        assert walk(children, combo) == (matches[0] if matches else -1)
    # Atomic items: a single-level trie whose root leads straight to each item.
    np.testing.assert_array_equal(item_trie(AtomicItems(["a", "b", "c"]).code_table()), [[0, 1, 2]])


def brute_force_item_logps(model, prompt, codes, starts):
    """Log-probability of each item's code tuple, renormalised at every level over the trie's children,
    from one full forward pass over every item's complete sequence."""
    n, levels = codes.shape
    tokens = jnp.asarray([list(prompt) + [starts[l] + int(c) for l, c in enumerate(row)] for row in codes])
    hidden, _ = model.hidden(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), jnp.ones_like(tokens))
    logits = np.asarray(model.logits(hidden))
    out = np.zeros(n)
    for item, row in enumerate(codes):
        for level, c in enumerate(row):
            size = int(codes[:, level].max()) + 1
            allowed = {r[level] for r in codes if tuple(r[:level]) == tuple(row[:level])}
            mask = jnp.asarray([k in allowed for k in range(size)])
            level_logits = logits[item, len(prompt) - 1 + level, starts[level]:starts[level] + size]
            out[item] += float(constrained_logp(jnp.asarray(level_logits), mask)[c])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_item_beam_search_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    codes = np.unique(rng.integers(0, 3, (14, 3)), axis=0)
    items = SemanticItems([f"i{k}" for k in range(len(codes))], codes)
    first = 10
    cfg = TransformerConfig(vocab_size=first + items.num_tokens, d_model=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, mlp_dim=64)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    prompts = jnp.asarray([[1, 2, 3, 4, 0], [1, 5, 6, 0, 0]])
    lengths = jnp.asarray([4, 3])
    starts = tuple(first + o for o in items.level_offsets)
    excluded = np.zeros((2, len(codes)), bool)
    excluded[1, [0, 3]] = True
    n = len(codes)
    found, scores = item_beam_search(graphdef, params, prompts, lengths, jnp.asarray(item_trie(codes)),
                                     jnp.asarray(excluded), level_starts=starts, level_sizes=tuple(items.level_sizes),
                                     beam_size=n)
    for row in range(2):
        expected = brute_force_item_logps(model, np.asarray(prompts[row, :lengths[row]]), codes, starts)
        if row == 1:
            # Excluded items vanish; the others' last-level probabilities renormalise without them.
            keep = ~excluded[1]
            assert set(np.asarray(found[1])[: keep.sum()]) == set(np.flatnonzero(keep))
            assert np.all(np.asarray(found[1])[keep.sum():] == -1)
            continue
        order = np.argsort(-expected)
        np.testing.assert_array_equal(np.asarray(found[row]), order)
        np.testing.assert_allclose(np.asarray(scores[row]), expected[order], rtol=1e-4, atol=1e-4)

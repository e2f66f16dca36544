"""Item attributes embedded beside item tokens (`data.item_attributes`): the table, the model's embedding
rows, and a sharded run whose checkpoint serves pages with them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import params_of, tiny_config
from flax import nnx

from homegen.configs.amazon_next_item import amazon_config
from homegen.data.attributes import NO_ATTRIBUTE, ItemAttributes
from homegen.data.vocab import AtomicItems, Vocabulary
from homegen.model.transformer import Transformer, TransformerConfig
from homegen.serving.engine import PageEngine
from homegen.serving.requests import parse_request
from homegen.training.data import item_features_path
from homegen.training.loop import TrainingError, run


def test_attribute_table_keeps_the_first_distinct_values_of_each_item():
    attrs = ItemAttributes.from_mapping(["a", "b", "c"], {"a": [7, 3, 7, 9], "c": ["x"]}, per_item=2)
    assert attrs.names == ["7", "3", "x"]
    np.testing.assert_array_equal(attrs.table, [[1, 2], [NO_ATTRIBUTE, NO_ATTRIBUTE], [3, NO_ATTRIBUTE]])
    assert attrs.coverage() == pytest.approx(2 / 3)
    table = attrs.token_table(vocab_size=8, item_offset=4)
    np.testing.assert_array_equal(table[:4], 0)
    np.testing.assert_array_equal(table[4:7], attrs.table)
    np.testing.assert_array_equal(table[7], 0)
    with pytest.raises(ValueError, match="none of the items"):
        ItemAttributes.from_mapping(["a"], {"b": [1]}, per_item=2)


def test_vocabulary_keeps_its_attributes_through_json_and_refuses_to_extend_them(tiny_checkpoint):
    plain = Vocabulary.load(f"{tiny_checkpoint}/vocab")
    attrs = ItemAttributes.from_mapping(plain.items.item_ids, {plain.items.item_ids[0]: ["rock"]}, per_item=3)
    vocab = Vocabulary(plain.context_tokens, plain.shelves, plain.items, plain.sentencepiece_model,
                       plain.max_history, attrs)
    again = Vocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
    np.testing.assert_array_equal(again.attribute_table(), vocab.attribute_table())
    assert again.attribute_table()[vocab.item_offset, 0] == 1 and again.attribute_table()[vocab.item_offset + 1, 0] == 0
    with pytest.raises(ValueError, match="does not grow item attribute tables"):
        vocab.extended_with(plain)
    with pytest.raises(ValueError, match="one row per item"):
        Vocabulary(plain.context_tokens, plain.shelves, AtomicItems(["x"]), plain.sentencepiece_model, 50, attrs)


def test_an_items_embedding_is_its_row_plus_the_mean_of_its_attributes():
    cfg = TransformerConfig(vocab_size=6, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                            mlp_dim=16, num_attributes=3, attributes_per_item=2)
    model = Transformer(cfg, nnx.Rngs(0))
    model.attribute_ids[...] = jnp.asarray([[0, 0], [0, 0], [1, 0], [1, 2], [3, 3], [0, 0]], jnp.int32)
    embed, attr = np.asarray(model.embed[...]), np.asarray(model.attribute_embed[...])
    expected = embed + np.stack([0 * attr[0], 0 * attr[0], attr[1], (attr[1] + attr[2]) / 2, attr[3], 0 * attr[0]])
    np.testing.assert_allclose(model.output_rows(), expected, rtol=1e-6)
    np.testing.assert_allclose(model.output_rows(jnp.asarray([3, 0])), expected[[3, 0]], rtol=1e-6)
    hidden, _ = model.hidden(jnp.asarray([[2, 3]]), jnp.asarray([[0, 1]]), jnp.ones((1, 2), jnp.int32))
    np.testing.assert_allclose(model.logits(hidden), np.asarray(hidden) @ expected.T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="both set or both 0"):
        TransformerConfig(vocab_size=6, num_attributes=3)


def test_attribute_words_add_the_embedding_of_their_text_tokens():
    """With attribute_words, attribute a's row is its own plus the mean of the token embeddings of its value's
    words, so an item and an intent written with those words share a trained component."""
    cfg = TransformerConfig(vocab_size=6, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                            mlp_dim=16, num_attributes=2, attributes_per_item=1, attribute_words=2)
    model = Transformer(cfg, nnx.Rngs(0))
    model.attribute_ids[...] = jnp.asarray([[0], [0], [0], [1], [2], [0]], jnp.int32)
    model.attribute_words[...] = jnp.asarray([[0, 0], [1, 2], [0, 0]], jnp.int32)  # attribute 2 has no words
    embed, attr = np.asarray(model.embed[...]), np.asarray(model.attribute_embed[...])
    expected = embed.copy()
    expected[3] += attr[1] + (embed[1] + embed[2]) / 2
    expected[4] += attr[2]
    np.testing.assert_allclose(model.output_rows(), expected, rtol=1e-6)
    grads = nnx.grad(lambda m: (m.output_rows()[3] ** 2).sum())(model)  # a loss on item 3 ...
    assert np.abs(np.asarray(grads["embed"][...])[[1, 2]]).min() > 0  # ... trains its words' embeddings
    with pytest.raises(ValueError, match="needs item attributes"):
        TransformerConfig(vocab_size=6, attribute_words=2)


def test_attribute_word_table_holds_each_values_pieces(tiny_checkpoint):
    plain = Vocabulary.load(f"{tiny_checkpoint}/vocab")
    items = plain.items.item_ids
    attrs = ItemAttributes.from_mapping(items, {items[0]: ["genre=jazz", "released=2024-06"], items[1]: ["mood=sad"]},
                                        per_item=2)
    assert attrs.words() == ["jazz", "", "sad"]
    vocab = Vocabulary(plain.context_tokens, plain.shelves, plain.items, plain.sentencepiece_model,
                       plain.max_history, attrs)
    table = vocab.attribute_word_table(3)
    assert table.shape == (4, 3) and (table[0] == 0).all() and (table[2] == 0).all()
    jazz = [t for t in table[1] if t]
    assert jazz == [vocab.text_offset + p for p in vocab.sp.encode("jazz")][:3]
    assert vocab.encode_prompt({}, "jazz", [])[1:1 + len(jazz) + 1][-len(jazz):] == jazz  # an intent's tokens


def test_a_sharded_run_learns_attribute_embeddings_and_serves_pages(data_dir, tmp_path):
    """On 8 devices (data 2 x fsdp 2 x tensor 2): the catalog's artist/genre/release attributes are in the
    vocabulary and the checkpoint; their embeddings train while the id table stays the vocabulary's; the
    checkpoint serves valid pages."""
    cfg = tiny_config(data_dir, steps=8, log_every=4, eval_every=8, checkpoint_every=8)
    cfg.data.item_attributes = True
    cfg.data.attribute_words = 3
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
    result = run(cfg, str(tmp_path))
    assert result.losses[-1] < result.losses[0]
    vocab = result.vocab
    assert vocab.attributes is not None and vocab.attributes.coverage() == 1.0
    assert {name.split("=")[0] for name in vocab.attributes.names} >= {"artist", "genre", "released", "mood", "energy"}
    params = params_of(str(tmp_path))  # the checkpoint's
    np.testing.assert_array_equal(params["attribute_ids"], vocab.attribute_table())
    np.testing.assert_array_equal(params["attribute_words"], vocab.attribute_word_table(3))
    assert (params["attribute_words"] > 0).any()  # genres and moods are words
    assert result.trainer.model_cfg.num_attributes == vocab.attributes.num_attributes
    first = jax.device_get(result.trainer.fresh_params()["attribute_embed"])  # the same seed's start
    assert np.abs(params["attribute_embed"] - first).max() > 1e-4

    engine = PageEngine(str(tmp_path))
    request = parse_request({"user_id": "u1", "num_shelves": 2, "min_items_per_shelf": 3, "max_items_per_shelf": 3,
                             "history": vocab.items.item_ids[:5]})
    (page,) = engine.generate([request])
    assert "error" not in page and len(page["page"]) == 2 and all(len(s["items"]) == 3 for s in page["page"])


def test_item_attributes_need_atomic_items_and_a_source(data_dir, walks_file, tmp_path):
    cfg = tiny_config(data_dir)
    cfg.data.update(dict(item_attributes=True, item_tokens="semantic"))
    with pytest.raises(TrainingError, match="atomic item tokens"):
        run(cfg, str(tmp_path / "semantic"))
    cfg = amazon_config(walks_file)  # no attribute file next to the walks, no catalog
    with pytest.raises(TrainingError, match="needs item attributes: .* or set --config.data.item_attributes=False"):
        run(cfg, str(tmp_path / "walks"))


def test_interaction_data_finds_its_attribute_file_next_to_it(tmp_path):
    sequences = tmp_path / "Games.txt"
    sequences.write_text("u1 a b c\n")
    cfg = amazon_config(str(sequences))
    assert cfg.data.item_attributes and item_features_path(cfg.data) == ""  # none there: training says so
    (tmp_path / "Games_item2attributes.json").write_text('{"a": [1]}')
    assert item_features_path(cfg.data) == str(tmp_path / "Games_item2attributes.json")
    cfg.data.item_features = "/elsewhere/attributes.json"  # an explicit file wins
    assert item_features_path(cfg.data) == "/elsewhere/attributes.json"

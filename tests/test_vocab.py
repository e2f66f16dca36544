import numpy as np
import pytest

from homegen.data.formats import CatalogItem, PageLog, Shelf, UserSequence
from homegen.data.vocab import BOS, EOS, NEXT_ITEM_SHELF, PAGE, SEP, SKIPPED, STREAMED, Vocabulary, VocabularyBuilder


@pytest.fixture(scope="module")
def vocab():
    builder = VocabularyBuilder()
    builder.add_catalog([CatalogItem("t1", "Golden Hour", "Nova Lake", ["indie pop"]),
                         CatalogItem("t2", "Blue River", "Ka Mo", ["jazz"])])
    for k in range(3):
        builder.add_page(PageLog(f"u{k}", [Shelf("made_for_you", ["t1", "t3"], [1, 0]),
                                           Shelf("new_releases", ["t4", "t5", "t2"])],
                                 context={"hour": str(8 + k), "device": "mobile"}, intent="calm music for studying",
                                 history=["t9", "t2"]))
    builder.add_sequence(UserSequence("x", ["t1", "t7"]))
    return builder.build(max_history=3, sentencepiece_vocab=60)


def test_layout(vocab):
    assert vocab.shelves == ["made_for_you", "new_releases", NEXT_ITEM_SHELF]
    assert vocab.items.item_ids[:2] == ["t1", "t2"] and vocab.items.num_tokens == 7
    assert vocab.size == vocab.item_offset + 7
    ranges = [vocab.context_offset, vocab.text_offset, vocab.shelf_offset, vocab.item_offset, vocab.size]
    assert ranges == sorted(ranges)
    assert "device=<unk>" in vocab.context_tokens and "hour=9" in vocab.context_tokens


def test_page_round_trip(vocab):
    log = PageLog("u", [Shelf("new_releases", ["t5", "t1"], [0, 2]), Shelf("next", ["t7"])],
                  context={"device": "mobile", "hour": "9"}, intent="calm music", history=["t1", "t2", "t3", "t4"])
    enc = vocab.encode(log, stream_weight=0.5)
    tokens = enc.tokens.tolist()
    assert tokens[0] == BOS and tokens[-1] == EOS and tokens.count(PAGE) == 1
    page_start = tokens.index(PAGE) + 1
    assert [(s.shelf, s.items) for s in vocab.decode_page(tokens)] == [("new_releases", ["t5", "t1"]), ("next", ["t7"])]
    # Only the generated part is a target; a streamed item weighs 1 + 0.5 * streams.
    assert np.all(enc.weights[:page_start] == 0) and np.all(enc.weights[page_start:] > 0)
    assert enc.weights[page_start + 2] == 2.0 and enc.weights[page_start + 1] == 1.0
    # skip_weight: an item shown and not streamed weighs that; one logged without streams still weighs 1.
    unskipped = vocab.encode(log, stream_weight=0.5, skip_weight=0.0)
    assert unskipped.weights[page_start + 1] == 0.0 and unskipped.weights[page_start + 2] == 2.0
    assert unskipped.weights[page_start + 4] == 1.0 and tokens[page_start + 3] == vocab.shelf_token("next")
    np.testing.assert_array_equal(unskipped.outcomes, enc.outcomes)
    # Stream outcomes label the items of shelves with known streams, nothing else.
    outcomes = np.zeros(len(tokens), np.int32)
    outcomes[page_start + 1:page_start + 3] = [SKIPPED, STREAMED]
    np.testing.assert_array_equal(enc.outcomes, outcomes)
    # History keeps the last max_history items, in order.
    first_sep = tokens.index(SEP)
    second_sep = tokens.index(SEP, first_sep + 1)
    history = [vocab.items.decode([t - vocab.item_offset]) for t in tokens[second_sep + 1:page_start - 1]]
    assert history == ["t2", "t3", "t4"]
    # Intent pieces decode back to the text.
    pieces = [t - vocab.text_offset for t in tokens[first_sep + 1:second_sep]]
    assert vocab.sp.decode(pieces) == "calm music"


def test_context_tokens(vocab):
    known = vocab.context_token_ids({"hour": "9", "device": "mobile", "color": "red"})
    assert [vocab.context_tokens[t - vocab.context_offset] for t in known] == ["device=mobile", "hour=9"]
    unseen = vocab.context_token_ids({"hour": "23"})
    assert [vocab.context_tokens[t - vocab.context_offset] for t in unseen] == ["hour=<unk>"]


def test_unknown_items_and_shelves_are_dropped(vocab):
    encoded = vocab.encode_page([Shelf("nope", ["t1"]), Shelf("made_for_you", ["zzz", "t2"]),
                                 Shelf("new_releases", ["zzz"])])
    assert [(s.shelf, s.items) for s in vocab.decode_page(encoded.tokens)] == [("made_for_you", ["t2"])]


def test_grammar_errors(vocab):
    with pytest.raises(ValueError, match="grammar"):
        vocab.decode_page([PAGE, vocab.item_offset, EOS])
    with pytest.raises(ValueError, match="grammar"):
        vocab.decode_page([PAGE, vocab.shelf_offset, SEP, EOS])


def test_save_load(vocab, tmp_path):
    vocab.save(str(tmp_path))
    loaded = Vocabulary.load(str(tmp_path))
    log = PageLog("u", [Shelf("made_for_you", ["t1", "t2"])], context={"hour": "8"}, intent="calm", history=["t9"])
    assert loaded.encode(log).tokens.tolist() == vocab.encode(log).tokens.tolist()
    assert loaded.size == vocab.size
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Vocabulary.load(str(tmp_path / "missing"))


def test_a_large_catalog_gives_every_id_and_a_bounded_sample_of_its_text():
    catalog = [CatalogItem(f"t{k}", f"title{k}") for k in range(50)]
    builder = VocabularyBuilder()
    builder.add_catalog(catalog, max_texts=10)
    assert list(builder.items) == [f"t{k}" for k in range(50)]
    assert len(builder.text) == 10 and len(set(builder.text)) == 10
    assert any(int(t[5:]) >= 10 for t in builder.text)  # a sample of the whole catalog, not its head
    whole = VocabularyBuilder()
    whole.add_catalog(catalog)
    assert whole.text == [f"title{k}" for k in range(50)]

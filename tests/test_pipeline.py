import json

import numpy as np
import pytest

from homegen.data.builders import page_log_to_example
from homegen.data.formats import PageLog, Shelf
from homegen.data.pipeline import PipelineConfig, make_dataset
from homegen.data.vocab import BOS, NO_OUTCOME, PAGE, SKIPPED, STREAMED, VocabularyBuilder

NUM = 60


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(0)
    logs = []
    for k in range(NUM):
        page = []
        for j in range(rng.integers(1, 4)):
            items = [f"i{x}" for x in rng.choice(300, rng.integers(2, 8), replace=False)]
            streams = [float(x) for x in rng.integers(0, 2, len(items))] if k % 2 else None  # half unlabelled
            page.append(Shelf(f"s{j}", items, streams))
        logs.append(PageLog(f"u{k}", page, request_id=f"r{k}", context={"hour": str(k % 24)},
                            history=[f"h{k}"] + [f"i{x}" for x in rng.choice(300, 3)]))
    builder = VocabularyBuilder()
    for log in logs:
        builder.add_page(log)
    return [page_log_to_example(log) for log in logs], builder.build(sentencepiece_vocab=40)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("pack", [True, False])
def test_resume_is_exact(records, pack):
    source, vocab = records
    config = PipelineConfig(seq_len=48, batch_size=4, pack=pack, shuffle_seed=3)
    it = iter(make_dataset(source, vocab, "pages", config))
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # the state survives serialisation
    expected = take(it, 20)  # crosses an epoch boundary
    resumed = iter(make_dataset(source, vocab, "pages", config))
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 20)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_worker_processes_resume_exactly_and_cover_the_epoch(records):
    """With grain worker processes the state resumes exactly, and one epoch holds the same rows as without."""
    source, vocab = records
    config = PipelineConfig(seq_len=48, batch_size=4, pack=False, shuffle_seed=3, workers=2)
    it = iter(make_dataset(source, vocab, "pages", config))
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    resumed = iter(make_dataset(source, vocab, "pages", config))
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 5)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    it.close(), resumed.close()

    def epoch_rows(workers: int) -> list[bytes]:  # 5 rows a batch: each worker's 30 records fill its batches
        one_epoch = PipelineConfig(seq_len=48, batch_size=5, pack=False, shuffle_seed=3, num_epochs=1, workers=workers)
        iterator = iter(make_dataset(source, vocab, "pages", one_epoch))
        rows = sorted(row.tobytes() for batch in iterator for row in batch["tokens"])
        iterator.close()
        return rows

    in_process, with_workers = epoch_rows(0), epoch_rows(2)
    assert len(in_process) == NUM and with_workers == in_process


def test_packed_batches_are_well_formed(records):
    source, vocab = records
    batch = next(iter(make_dataset(source, vocab, "pages", PipelineConfig(seq_len=64, batch_size=4))))
    assert batch["tokens"].shape == (4, 65)
    seg, pos, tok, w = batch["segment_ids"], batch["positions"], batch["tokens"], batch["weights"]
    assert np.all(w[seg == 0] == 0) and np.all(tok[seg == 0] == 0)
    # Stream outcomes travel with their item tokens through packing: items of labelled pages only.
    outcomes = batch["outcomes"]
    assert {SKIPPED, STREAMED} <= set(np.unique(outcomes)) and np.all(outcomes[tok < vocab.item_offset] == NO_OUTCOME)
    assert (seg.max(axis=1) > 1).any()  # something really was packed
    for row in range(4):
        for s in np.unique(seg[row][seg[row] > 0]):
            where = np.flatnonzero(seg[row] == s)
            assert tok[row, where[0]] == BOS and np.array_equal(pos[row, where], np.arange(len(where)))
            page_at = where[np.flatnonzero(tok[row, where] == PAGE)[0]]
            assert np.all(w[row, where[where <= page_at]] == 0) and np.all(w[row, where[where > page_at]] > 0)


def test_process_shards_are_disjoint_and_complete(records):
    source, vocab = records
    config = PipelineConfig(seq_len=48, batch_size=1, pack=False, num_epochs=1)
    seen = []
    for shard in range(2):
        shard_users = set()
        for batch in make_dataset(source, vocab, "pages", config, shard_index=shard, shard_count=2):
            tokens = batch["tokens"][0].tolist()
            first_history = tokens[tokens.index(PAGE) - 4] - vocab.item_offset
            shard_users.add(vocab.items.item_ids[first_history])
        seen.append(shard_users)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"h{k}" for k in range(NUM)}


def test_outcome_conditioning_labels_pages_and_serving_asks_for_the_best():
    from types import SimpleNamespace

    from homegen.data.relabel import BEST_OUTCOME, OUTCOME_FIELD, with_outcome
    from homegen.serving.engine import PageEngine
    from homegen.serving.requests import parse_request

    def log(streams):
        return PageLog("u", [Shelf("s", ["a", "b"], streams[:2]), Shelf("t", ["c"], streams[2:])], context={"hour": "8"})

    buckets = {0: "0", 1: "1", 2: "2", 3: "3-4", 4: "3-4", 5: "5+", 9: "5+"}
    for total, bucket in buckets.items():
        labelled = with_outcome(log([float(total), 0.0, 0.0]))
        assert labelled.context == {"hour": "8", OUTCOME_FIELD: bucket}
    assert with_outcome(log([1.0, 1.0, 1.0])).context[OUTCOME_FIELD] == "3-4"  # streams add up over shelves

    builder = VocabularyBuilder()
    for total in buckets:
        builder.add_page(with_outcome(log([float(total), 0.0, 0.0])))
    vocab = builder.build(sentencepiece_vocab=20)
    assert vocab.conditions_on_outcome()
    source = [page_log_to_example(log([6.0, 0.0, 0.0]))]
    config = PipelineConfig(seq_len=32, batch_size=1, pack=False, outcome_conditioning=True)
    tokens = next(iter(make_dataset(source, vocab, "pages", config)))["tokens"][0]
    best = vocab.context_token_ids({OUTCOME_FIELD: BEST_OUTCOME})[0]
    assert best in tokens

    engine = SimpleNamespace(vocab=vocab)
    asked = PageEngine.prompt(engine, parse_request({"user_id": "u", "context": {"hour": 8}}))
    assert best in asked
    chosen = PageEngine.prompt(engine, parse_request({"user_id": "u", "context": {"hour": 8, OUTCOME_FIELD: "1"}}))
    assert best not in chosen and vocab.context_token_ids({OUTCOME_FIELD: "1"})[0] in chosen
    # A vocabulary without outcome labels serves prompts unchanged.
    plain = VocabularyBuilder()
    plain.add_page(log([1.0, 0.0, 0.0]))
    plain_vocab = plain.build(sentencepiece_vocab=20)
    assert not plain_vocab.conditions_on_outcome()
    request = parse_request({"user_id": "u", "context": {"hour": 8}})
    assert PageEngine.prompt(SimpleNamespace(vocab=plain_vocab), request) == plain_vocab.encode_prompt(
        request.context, request.intent, request.history)


def test_streamed_first_moves_streamed_items_to_the_front_of_each_shelf():
    from homegen.data.relabel import relabeler, streamed_first

    log = PageLog("u", [Shelf("s", ["a", "b", "c", "d"], [0.0, 1.0, 0.0, 2.0]), Shelf("t", ["e", "f"], None)],
                  context={"hour": "8"})
    out = streamed_first(log)
    assert out.page[0].items == ["d", "b", "a", "c"] and out.page[0].streams == [2.0, 1.0, 0.0, 0.0]
    assert out.page[1].items == ["e", "f"]
    assert log.page[0].items == ["a", "b", "c", "d"]  # the logged page itself is untouched
    both = relabeler(outcome=True, order_by_streams=True)(log)
    assert both.page[0].items == ["d", "b", "a", "c"] and both.context["outcome"] == "3-4"
    assert relabeler(False, False)(log) is log


def test_hindsight_intents_are_written_from_what_most_streamed_items_share():
    from homegen.data.attributes import ItemAttributes
    from homegen.data.relabel import item_words, with_hindsight_intent

    attributes = ItemAttributes(["mood=sad", "genre=jazz", "genre=rock", "artist=X"],
                                np.array([[1, 2], [1, 3], [1, 2], [4, 0]]))
    words = item_words(attributes, ["a", "b", "c", "d"], ["mood", "genre"])
    assert words == {"a": {"mood": "sad", "genre": "jazz"}, "b": {"mood": "sad", "genre": "rock"},
                     "c": {"mood": "sad", "genre": "jazz"}}
    log = PageLog("u", [Shelf("s", ["a", "b", "c", "d"], [1.0, 1.0, 2.0, 1.0])], request_id="r1")
    assert with_hindsight_intent(log, words, ["mood", "genre"], 1.0).intent == "sad jazz"
    assert with_hindsight_intent(log, words, ["genre"], 1.0).intent == "jazz"
    only_one = PageLog("u", [Shelf("s", ["a", "b", "c"], [1.0, 1.0, 0.0])], request_id="r1")
    assert with_hindsight_intent(only_one, words, ["mood", "genre"], 1.0).intent == "sad"  # genres split 1-1
    asked = PageLog("u", log.page, request_id="r1", intent="workout energy")
    assert with_hindsight_intent(asked, words, ["mood"], 1.0) is asked  # a logged intent is kept
    pages = [PageLog(f"u{k}", log.page, request_id=f"r{k}") for k in range(400)]
    shown = [with_hindsight_intent(p, words, ["mood"], 0.25).intent for p in pages]
    assert 60 < sum(x is not None for x in shown) < 140  # the share, fixed by the page's hash
    assert shown == [with_hindsight_intent(p, words, ["mood"], 0.25).intent for p in pages]


def test_user_tokens_name_known_users_and_a_fixed_share_of_pages_hides_them():
    from types import SimpleNamespace

    from homegen.data.relabel import USER_FIELD, with_user
    from homegen.serving.engine import PageEngine
    from homegen.serving.requests import parse_request

    logs = [PageLog(f"u{k % 50}", [Shelf("s", ["a", "b"], [1.0, 0.0])], context={"hour": "8"}, request_id=f"r{k}")
            for k in range(2000)]
    builder = VocabularyBuilder()
    for log in logs:
        builder.add_page(with_user(log))
    vocab = builder.build(sentencepiece_vocab=20)
    known, unknown = vocab.context_token_ids({USER_FIELD: "u7"}), vocab.context_token_ids({USER_FIELD: "stranger"})
    assert len(known) == 1 and len(unknown) == 1 and known != unknown
    assert [with_user(log, 0.1).context[USER_FIELD] for log in logs[:3]] == [
        with_user(log, 0.1).context[USER_FIELD] for log in logs[:3]]  # the same on every pass
    config = PipelineConfig(seq_len=16, batch_size=2000, pack=False, user_tokens=True, unknown_user_fraction=0.1)
    batch = next(iter(make_dataset([page_log_to_example(log) for log in logs], vocab, "pages", config)))
    hidden = float(np.mean(batch["tokens"][:, 2] == unknown[0]))
    assert 0.08 < hidden < 0.12 and logs[0].context == {"hour": "8"}
    # Serving puts the request's user in the prompt; a user the vocabulary lacks gets the unknown token, and a
    # vocabulary without user tokens serves the prompt it always did.
    engine = SimpleNamespace(vocab=vocab)
    assert known[0] in PageEngine.prompt(engine, parse_request({"user_id": "u7", "context": {"hour": 8}}))
    assert unknown[0] in PageEngine.prompt(engine, parse_request({"user_id": "new", "context": {"hour": 8}}))
    plain = VocabularyBuilder()
    plain.add_page(logs[0])
    plain_vocab = plain.build(sentencepiece_vocab=20)
    request = parse_request({"user_id": "u7", "context": {"hour": 8}})
    assert PageEngine.prompt(SimpleNamespace(vocab=plain_vocab), request) == plain_vocab.encode_prompt(
        request.context, None, [])

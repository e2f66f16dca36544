import os

import pytest
import tensorflow_datasets as tfds
from conftest import shared_file
from tensorflow_datasets.core import example_serializer

from homegen.data.builders import (
    PAGE_FEATURES,
    InteractionDataset,
    PageLogDataset,
    SyntheticWorldDataset,
    example_to_page_log,
    example_to_sequence,
    page_log_to_example,
    serialize_page_example,
)
from homegen.data.formats import PageLog, Shelf, iter_page_logs


def test_page_log_builder_round_trips(tiny_world_dir, tmp_path):
    path = os.path.join(tiny_world_dir, "pages.jsonl")
    builder = PageLogDataset.for_files([path], str(tmp_path), validation_fraction=0.1, test_fraction=0.1)
    builder.download_and_prepare()
    source = builder.as_data_source()
    logs = {log.request_id: log for log in iter_page_logs(path)}
    assert sum(len(source[s]) for s in ("train", "validation", "test")) == len(logs)
    assert 200 < len(source["test"]) < 400
    latest_train = max(example_to_page_log(source["train"][k]).timestamp for k in range(len(source["train"])))
    earliest_test = min(example_to_page_log(source["test"][k]).timestamp for k in range(len(source["test"])))
    assert latest_train <= earliest_test
    for k in range(0, len(source["train"]), 97):
        got = example_to_page_log(source["train"][k])
        assert got == logs[got.request_id]


def test_splits_larger_than_tfds_shuffle_buffer_build_without_tensorflow(tiny_world_dir, tmp_path, monkeypatch):
    """TFDS spills a split's shuffle buffer to disk (through TensorFlow, not installed) once it passes
    MAX_MEM_BUFFER_SIZE: with that limit shrunk to 1 kB, as a 10^6-page log exceeds the real 1 GB, the
    builder still writes every page (and restores the limit)."""
    from tensorflow_datasets.core import shuffle

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
    path = os.path.join(tiny_world_dir, "pages.jsonl")
    builder = PageLogDataset.for_files([path], str(tmp_path), validation_fraction=0.1)
    builder.download_and_prepare()
    source = builder.as_data_source()
    assert len(source["train"]) + len(source["validation"]) == sum(1 for _ in iter_page_logs(path))
    assert shuffle.MAX_MEM_BUFFER_SIZE == 1000


def test_two_page_log_files_of_the_same_name_build_together(tiny_world_dir, tmp_path):
    """The world's logs and a later round's served logs are both called pages.jsonl: each line is kept."""
    first = os.path.join(tiny_world_dir, "pages.jsonl")
    (tmp_path / "round1").mkdir()
    second = tmp_path / "round1" / "pages.jsonl"
    lines = open(first).readlines()[:300]
    second.write_text("".join(line.replace('"request_id": "', '"request_id": "again-') for line in lines))
    builder = PageLogDataset.for_files([first, str(second)], str(tmp_path / "tfds"), validation_fraction=0.1)
    builder.download_and_prepare()
    source = builder.as_data_source()
    assert len(source["train"]) + len(source["validation"]) == sum(1 for _ in iter_page_logs(first)) + 300


def test_unknown_streams_stay_unknown():
    log = PageLog("u1", [Shelf("a", ["t1", "t2"]), Shelf("b", ["t3"], [0.0])], request_id="r1")
    assert example_to_page_log(page_log_to_example(log)).page == log.page


def test_missing_page_log_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PageLogDataset.for_files([str(tmp_path / "nope.jsonl")], str(tmp_path))


def test_synthetic_world_builder(tmp_path):
    builder = SyntheticWorldDataset(config="tiny", data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source = builder.as_data_source()
    assert len(source["train"]) + len(source["validation"]) == 5_000 and len(source["test"]) == 200
    assert os.path.exists(os.path.join(builder.world_dir(), "catalog.jsonl"))
    log = example_to_page_log(source["test"][0])
    assert log.user_id.startswith("u") and log.page and log.page[0].streams is not None


def test_interactions_builder_on_toys(tmp_path):
    path = shared_file("amazon", "Toys_and_Games.txt")
    builder = InteractionDataset.for_file(path, str(tmp_path))
    builder.download_and_prepare()
    source = builder.as_data_source()
    test = [example_to_sequence(source["test"][k]) for k in range(len(source["test"]))]
    assert len(test) == 19_412
    assert sum(len(u.items) for u in test) == 167_597
    assert len({i for u in test for i in u.items}) == 11_924
    assert len(source["train"]) == len(source["validation"]) == 19_412
    by_user = {u.user_id: u.items for u in test}
    for k in range(0, 19_412, 1000):
        val = example_to_sequence(source["validation"][k])
        assert val.items == by_user[val.user_id][:-1]


def test_page_examples_serialize_to_the_bytes_tfds_writes():
    """`serialize_page_example` builds the tf.train.Example itself; TFDS's generic encoder and serializer give
    the same bytes, for pages with and without context, history, intent, timestamp and streams."""
    features = tfds.features.FeaturesDict(PAGE_FEATURES)
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    logs = [
        PageLog("u1", [Shelf("made_for_you", ["t1", "t2"], [2.0, 0.0]), Shelf("new_releases", ["t3"], None)],
                request_id="r1", timestamp=1_700_000_000.25, context={"hour": "8", "device": "tv"},
                intent="calme, ça va", history=["t9", "t8"]),
        PageLog("ü", [Shelf("s", ["t1"])]),  # no request id, time, context, intent, history or streams
    ]
    for log in logs:
        example = page_log_to_example(log)
        assert serialize_page_example(example) == serializer.serialize_example(features.encode_example(example))

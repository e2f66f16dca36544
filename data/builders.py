"""TFDS builders (array_record files, read with `as_data_source`, no TensorFlow needed).

- `PageLogDataset`: page logs (FORMATS.md §3) from user-given JSON Lines, split by time.
- `SyntheticWorldDataset`: the synthetic world at a size preset (simulated into its download folder, then
  read like user logs).
- `InteractionDataset`: interaction sequences (FORMATS.md §1), leave-one-out split.

Records keep ids as strings; tokenization happens in the input pipeline with the run's vocabulary.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

from homegen.data.formats import PageLog, Shelf, UserSequence, iter_page_logs, read_interactions
from homegen.data.simulator.simulate import write_world
from homegen.data.simulator.world import WorldConfig
from homegen.data.splits import leave_one_out, page_split, time_cut_offs, time_splits

_TEXTS = tfds.features.Sequence(tfds.features.Text())
PAGE_FEATURES = {
    "request_id": tfds.features.Text(), "user_id": tfds.features.Text(), "timestamp_us": np.int64,
    "context_keys": _TEXTS, "context_values": _TEXTS, "intent": tfds.features.Text(), "history": _TEXTS,
    "shelves": _TEXTS, "shelf_sizes": tfds.features.Sequence(np.int32), "items": _TEXTS,
    "streams": tfds.features.Sequence(np.float32),
}
SEQUENCE_FEATURES = {"user_id": tfds.features.Text(), "items": _TEXTS,
                     "timestamps_us": tfds.features.Sequence(np.int64)}
NO_TIME = np.iinfo(np.int64).min  # Example protos hold float32 or int64: times are stored as int64 µs
NO_STREAMS = -1.0  # stored for every item of a shelf logged without streams (unknown, not zero)


class _InMemoryShuffle(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS shuffles each split while writing it and, past 1 GB, spills the shuffle buffer to disk through
    `tf.io.gfile`, which needs TensorFlow (homegen does not install it: it reads with `as_data_source`). A
    10^6-page log crossed that and failed with "No module named 'tensorflow'". The builders therefore keep
    a split's shuffle buffer in memory, up to half this machine's RAM (a split's serialized size is about
    its JSON Lines size)."""

    def download_and_prepare(self, *args, **kwargs):
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        saved = tfds_shuffle.MAX_MEM_BUFFER_SIZE
        tfds_shuffle.MAX_MEM_BUFFER_SIZE = max(saved, limit)
        try:
            return super().download_and_prepare(*args, **kwargs)
        finally:
            tfds_shuffle.MAX_MEM_BUFFER_SIZE = saved


def _to_us(stamp: float | None) -> int:
    return NO_TIME if stamp is None else int(round(stamp * 1e6))


def _from_us(value) -> float | None:
    return None if int(value) == NO_TIME else int(value) / 1e6


def page_log_to_example(log: PageLog) -> dict:
    keys = sorted(log.context)
    return {
        "request_id": log.request_id or "", "user_id": log.user_id,
        "timestamp_us": _to_us(log.timestamp),
        "context_keys": keys, "context_values": [log.context[k] for k in keys], "intent": log.intent or "",
        "history": log.history, "shelves": [s.shelf for s in log.page],
        "shelf_sizes": np.array([len(s.items) for s in log.page], np.int32),
        "items": [i for s in log.page for i in s.items],
        "streams": np.array([(s.streams[k] if s.streams is not None else NO_STREAMS)
                             for s in log.page for k in range(len(s.items))], np.float32),
    }


def serialize_page_example(example: dict) -> bytes:
    """`example` (`page_log_to_example`'s) as the serialized tf.train.Example that TFDS writes for PAGE_FEATURES,
    built directly: the same bytes as TFDS's generic encoder and serializer (tests compare them), at a
    fraction of its time (13x on the small world's pages; it was most of `homegen prepare`'s parse stage)."""

    def texts(values) -> tf_feature_pb2.Feature:
        return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[v.encode("utf-8") for v in values]))

    def integers(values) -> tf_feature_pb2.Feature:
        return tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=values))

    feature = {  # PAGE_FEATURES' order, as TFDS's serializer fills the map
        "request_id": texts([example["request_id"]]), "user_id": texts([example["user_id"]]),
        "timestamp_us": integers([example["timestamp_us"]]), "context_keys": texts(example["context_keys"]),
        "context_values": texts(example["context_values"]), "intent": texts([example["intent"]]),
        "history": texts(example["history"]), "shelves": texts(example["shelves"]),
        "shelf_sizes": integers(example["shelf_sizes"]), "items": texts(example["items"]),
        "streams": tf_feature_pb2.Feature(float_list=tf_feature_pb2.FloatList(value=example["streams"])),
    }
    return tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=feature)).SerializeToString()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_to_page_log(example: dict) -> PageLog:
    """Inverse of `page_log_to_example` for a record read back from a data source."""
    items = [_text(i) for i in example["items"]]
    streams = [float(s) for s in example["streams"]]
    page, start = [], 0
    for shelf, size in zip(example["shelves"], example["shelf_sizes"]):
        end = start + int(size)
        known = [x for x in streams[start:end] if x != NO_STREAMS]
        page.append(Shelf(_text(shelf), items[start:end], known if len(known) == end - start else None))
        start = end
    return PageLog(
        user_id=_text(example["user_id"]), page=page, request_id=_text(example["request_id"]) or None,
        timestamp=_from_us(example["timestamp_us"]),
        context={_text(k): _text(v) for k, v in zip(example["context_keys"], example["context_values"])},
        intent=_text(example["intent"]) or None, history=[_text(i) for i in example["history"]])


def example_to_sequence(example: dict) -> UserSequence:
    stamps = [_from_us(t) for t in example["timestamps_us"]]
    return UserSequence(_text(example["user_id"]), [_text(i) for i in example["items"]], stamps or None)


def _fingerprint(*paths: str | None) -> str:
    """A config name that changes when any input file changes."""
    digest = hashlib.sha1()
    for path in paths:
        if path:
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def page_log_files(patterns: Sequence[str]) -> list[str]:
    """The files named by `patterns` (paths or globs, each glob's matches sorted), in order; a pattern that
    names no file is an error naming it."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"page log file {pattern} does not exist" if not glob.has_magic(pattern)
                                    else f"no page log file matches {pattern}")
        paths += matches
    return paths


def file_prefixes(paths: Sequence[str]) -> list[str]:
    """How each file names its records' keys: its base name, or `n/name` (its position in `paths` too) where
    two files share a name, e.g. LOGS/pages.jsonl and RUN/pages.jsonl."""
    names = [os.path.basename(path) for path in paths]
    return [f"{n}/{name}" if names.count(name) > 1 else name for n, name in enumerate(names)]


def _page_examples(paths: Sequence[str], cuts, split: str) -> Iterator[tuple[str, dict]]:
    """The page logs of `paths` that fall in `split` (all of them when `cuts` is None), keyed `prefix:k` for
    the k-th record of a file (`file_prefixes`)."""
    for path, prefix in zip(paths, file_prefixes(paths)):
        for k, log in enumerate(iter_page_logs(path)):
            if cuts is None or page_split(log, *cuts) == split:
                yield f"{prefix}:{k}", page_log_to_example(log)


def _time_cuts(paths: Sequence[str], validation_fraction: float, test_fraction: float):
    stamps = Counter(log.timestamp for path in paths for log in iter_page_logs(path) if log.timestamp is not None)
    return time_cut_offs(stamps, validation_fraction, test_fraction)


@dataclasses.dataclass
class PageLogConfig(tfds.core.BuilderConfig):
    page_logs: tuple[str, ...] = ()
    validation_fraction: float = 0.05
    test_fraction: float = 0.0


class PageLogDataset(_InMemoryShuffle):
    """Page logs from JSON Lines files; the last fractions by timestamp become validation and test."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Shelves logged without streams store -1 per item (unknown), not 0."}

    @classmethod
    def for_files(cls, page_logs: Sequence[str], data_dir: str, validation_fraction: float = 0.05,
                  test_fraction: float = 0.0) -> PageLogDataset:
        for path in page_logs:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"page log file {path} does not exist")
        config = PageLogConfig(name=f"logs_{_fingerprint(*page_logs)}", page_logs=tuple(page_logs),
                               validation_fraction=validation_fraction, test_fraction=test_fraction)
        return cls(config=config, data_dir=data_dir, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(PAGE_FEATURES))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        cuts = _time_cuts(cfg.page_logs, cfg.validation_fraction, cfg.test_fraction)
        return {s: self._generate_examples(cfg.page_logs, cuts, s)
                for s in time_splits(cfg.validation_fraction, cfg.test_fraction)}

    def _generate_examples(self, paths, cuts, split) -> Iterator[tuple[str, dict]]:
        return _page_examples(paths, cuts, split)


WORLD_PRESETS = {
    "tiny": dict(items=1_000, users=200, pages=5_000, requests=200),
    "small": dict(items=10_000, users=5_000, pages=100_000, requests=1_000),
    "medium": dict(items=100_000, users=50_000, pages=1_000_000, requests=2_000),
    "large": dict(items=1_000_000, users=100_000, pages=1_000_000, requests=2_000),
}


@dataclasses.dataclass
class WorldBuilderConfig(tfds.core.BuilderConfig):
    items: int = 1_000
    users: int = 200
    pages: int = 5_000
    requests: int = 200
    seed: int = 0


class SyntheticWorldDataset(_InMemoryShuffle):
    """The synthetic Home-page world: train = logged pages, validation = the last 5% of them by time,
    test = the logged pages of the held-out requests."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [WorldBuilderConfig(name=name, **size) for name, size in WORLD_PRESETS.items()]

    def world_dir(self) -> str:
        """Where the simulated catalog.jsonl / pages.jsonl / requests.jsonl live."""
        cfg = self.builder_config
        return os.path.join(str(self.data_dir_root), "downloads", f"world_{cfg.name}_seed{cfg.seed}")

    def world_config(self) -> WorldConfig:
        cfg = self.builder_config
        return WorldConfig(num_items=cfg.items, num_users=cfg.users, seed=cfg.seed)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(PAGE_FEATURES))

    def _split_generators(self, dl_manager):
        cfg, out = self.builder_config, self.world_dir()
        if not os.path.exists(os.path.join(out, "requests.jsonl")):
            write_world(self.world_config(), out, cfg.pages, cfg.requests)
        pages = os.path.join(out, "pages.jsonl")
        cuts = _time_cuts([pages], 0.05, 0.0)
        return {"train": self._generate_examples([pages], cuts, "train"),
                "validation": self._generate_examples([pages], cuts, "validation"),
                "test": self._generate_examples([os.path.join(out, "heldout_pages.jsonl")], None, "test")}

    def _generate_examples(self, paths, cuts, split) -> Iterator[tuple[str, dict]]:
        return _page_examples(paths, cuts, split)


@dataclasses.dataclass
class InteractionConfig(tfds.core.BuilderConfig):
    path: str = ""
    format: str = "auto"


class InteractionDataset(_InMemoryShuffle):
    """Interaction sequences, split leave-one-out (train: all but the last two items; validation: all but
    the last; test: all)."""

    VERSION = tfds.core.Version("1.0.0")

    @classmethod
    def for_file(cls, path: str, data_dir: str, fmt: str = "auto") -> InteractionDataset:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"interaction file {path} does not exist")
        config = InteractionConfig(name=f"interactions_{_fingerprint(path)}", path=path, format=fmt)
        return cls(config=config, data_dir=data_dir, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(SEQUENCE_FEATURES))

    def _split_generators(self, dl_manager):
        splits = leave_one_out(read_interactions(self.builder_config.path, self.builder_config.format))
        return {name: self._generate_examples(users) for name, users in splits.items()}

    def _generate_examples(self, users: list[UserSequence]) -> Iterator[tuple[int, dict]]:
        for k, user in enumerate(users):
            yield k, {"user_id": user.user_id, "items": user.items,
                      "timestamps_us": np.array([_to_us(t) for t in user.timestamps or []], np.int64)}

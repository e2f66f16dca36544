"""Page logs prepared by the Apache Beam pipeline (`homegen prepare`): the same dataset as the in-process
builder (examples, splits, order), malformed lines reported with file and line and left out of the
vocabulary too, --strict failing without leaving a dataset, and train.py opening the result without
rebuilding it."""

import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pytest

from homegen.commands.prepare import main as prepare_main
from homegen.configs.demo import get_config
from homegen.data.beam_prepare import prepare
from homegen.data.builders import PageLogDataset
from homegen.data.splits import time_cut_offs
from homegen.training import data as training_data
from homegen.training.data import absolute_data_paths, build_vocabulary, prepare_data, resolve_source

ONE_WORKER = ["--runner=DirectRunner", "--direct_num_workers=1"]


@pytest.fixture(scope="module")
def log_files(tiny_world_dir, tmp_path_factory):
    """The tiny world's 3,000 pages as three files of a glob, plus a fourth file of the same base name in
    another folder (keys then carry the file's position)."""
    folder = tmp_path_factory.mktemp("logs")
    lines = open(os.path.join(tiny_world_dir, "pages.jsonl")).read().splitlines(keepends=True)
    for k in range(3):
        (folder / f"part-{k}.jsonl").write_text("".join(lines[k * 800:(k + 1) * 800]))
    (folder / "other").mkdir()
    (folder / "other" / "part-0.jsonl").write_text("".join(lines[2400:]))
    return str(folder / "part-*.jsonl"), str(folder / "other" / "part-0.jsonl")


def _records(source) -> list[tuple]:
    return [tuple(np.asarray(v).tobytes() if isinstance(v, np.ndarray) else v for _, v in sorted(r.items()))
            for r in (source[k] for k in range(len(source)))]


def test_time_cut_offs_are_numpys_linear_quantiles():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 20, 1001):
        stamps = rng.integers(0, 50, n).astype(float) * 3600 + 0.5  # many repeated timestamps
        histogram = dict(zip(*np.unique(stamps, return_counts=True)))
        for valid, test in ((0.05, 0.0), (0.1, 0.05), (0.3, 0.2)):
            cuts = time_cut_offs(histogram, valid, test)
            assert cuts[0] == pytest.approx(np.quantile(stamps, 1 - valid - test), rel=1e-12)
            assert cuts[1] is None if not test else cuts[1] == pytest.approx(np.quantile(stamps, 1 - test), rel=1e-12)
    assert time_cut_offs({}, 0.05, 0.0) == (None, None)


def test_the_pipelines_hourly_plan_finds_the_exact_cut_offs():
    """The Beam plan ranks only the pages of the hours that hold a quantile's positions, yet its cut-offs and
    split sizes equal those from every timestamp (pages without one go to train)."""
    from homegen.data.beam_prepare import _hour, boundary_hours, merge_histograms, plan_splits
    from homegen.data.splits import time_split

    rng = np.random.default_rng(1)
    for n, spread in ((1, 3), (7, 2), (500, 40), (3000, 400)):
        stamps = list(rng.integers(0, spread * 3600, n) // 900 * 900 + 0.25) + [None] * 3  # repeats, several per hour
        sizes = rng.integers(50, 500, len(stamps))
        histogram = merge_histograms([{_hour(t): [1, int(b)]} for t, b in zip(stamps, sizes)])
        for valid, test in ((0.05, 0.0), (0.1, 0.05), (0.3, 0.2)):
            hours = boundary_hours(histogram, valid, test)
            boundary = [(t, int(b)) for t, b in zip(stamps, sizes) if t is not None and _hour(t) in hours]
            assert len(hours) <= 4 and len(boundary) <= n
            try:
                plan = plan_splits(histogram, valid, test, boundary, max_shard_bytes=1000)
            except ValueError as e:
                assert "would hold no page" in str(e) and n < 20
                continue
            expected = time_cut_offs(dict(zip(*np.unique([t for t in stamps if t is not None], return_counts=True))),
                                     valid, test)
            assert plan["cuts"] == expected
            bytes_of = {}
            for t, b in zip(stamps, sizes):
                split = time_split(t, *expected)
                bytes_of[split] = bytes_of.get(split, 0) + int(b)
            assert plan["shards"] == {split: max(1, -(-size // 1000)) for split, size in bytes_of.items()}


def test_beam_dataset_equals_the_builders_and_train_opens_it(log_files, tmp_path, monkeypatch):
    """Several workers (multi-processing DirectRunner), a glob, a repeated base name and shards small enough
    that each split has several: every split holds the builder's examples in the builder's order; train.py's
    data preparation then opens it as is."""
    patterns = list(log_files)
    beam_dir, plain_dir = str(tmp_path / "beam"), str(tmp_path / "plain")
    builder, errors = prepare(patterns, beam_dir, 0.1, 0.05,
                              ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                               "--direct_num_workers=2"], max_shard_bytes=200_000)
    assert errors == []
    shards = {name: split.num_shards for name, split in builder.info.splits.items()}
    assert shards["train"] >= 4 and shards["validation"] >= 2, shards  # order holds across hash-range shards
    assert not os.path.exists(os.path.join(builder.data_dir, "beam_temp"))
    plain = PageLogDataset.for_files(builder.builder_config.page_logs, plain_dir, 0.1, 0.05)
    plain.download_and_prepare()
    ours, theirs = builder.as_data_source(), plain.as_data_source()
    assert set(ours) == set(theirs) == {"train", "validation", "test"}
    assert {s: len(ours[s]) for s in ours} == {s: len(theirs[s]) for s in theirs}
    assert sum(len(ours[s]) for s in ours) == 3000
    for split in ours:
        assert _records(ours[split]) == _records(theirs[split]), split

    cfg = get_config().data
    cfg.page_logs, cfg.data_dir, cfg.validation_fraction, cfg.test_fraction = ",".join(patterns), beam_dir, 0.1, 0.05
    absolute_data_paths(cfg)  # the glob becomes its sorted files, as `homegen prepare` expanded it
    cfg.source = resolve_source(cfg)
    assert cfg.page_logs.split(",") == list(builder.builder_config.page_logs)

    def rebuild(*args, **kwargs):
        raise AssertionError("train.py rebuilt a dataset that homegen prepare had written")

    monkeypatch.setattr(PageLogDataset, "_generate_examples", rebuild)
    prepared = prepare_data(cfg, beam_dir, True, lambda name: None)
    assert len(prepared.sources["train"]) == len(ours["train"]) and prepared.skipped == {}
    assert prepared.log_counts == os.path.join(builder.data_dir, "log_counts.json")

    # The vocabulary from the counts Beam wrote equals training's own pass over the logs, for any relabeling;
    # the logs are then read only for semantic IDs' sequences, and only as far as they need.
    pages_read = []

    def counted(*args):
        for log in real_iter_page_logs(*args):
            pages_read.append(log)
            yield log

    real_iter_page_logs = training_data.iter_page_logs
    monkeypatch.setattr(training_data, "iter_page_logs", counted)
    for outcome, user, tokens in ((False, False, "atomic"), (True, True, "atomic"), (False, True, "semantic")):
        variant = cfg.copy_and_resolve_references()
        variant.update(dict(outcome_conditioning=outcome, user_tokens=user, item_tokens=tokens, sentencepiece_vocab=100,
                            semantic_levels=2, semantic_codes=8, semantic_max_sequences=300))
        pages_read.clear()
        vocab, counts, shelf_items = build_vocabulary(variant, prepared)
        assert len(pages_read) == (300 if tokens == "semantic" else 0)
        pages_read.clear()
        streamed_vocab, streamed_counts, streamed_shelf_items = build_vocabulary(
            variant, dataclasses.replace(prepared, log_counts=None))
        assert len(pages_read) == 3000
        assert vocab.to_json() == streamed_vocab.to_json(), (outcome, user, tokens)
        assert counts == streamed_counts and shelf_items == streamed_shelf_items
        assert ("user_id=<unk>" in vocab.context_tokens) == user


def test_malformed_lines_are_listed_skipped_and_left_out_of_the_vocabulary(log_files, tmp_path):
    """Four bad lines among good ones: each reported as file:line: reason, the dataset and training's
    vocabulary equal to those of the same log without them."""
    source = sorted(os.path.dirname(log_files[0]) + "/" + f for f in os.listdir(os.path.dirname(log_files[0]))
                    if f.startswith("part-"))[0]
    good = open(source).read().splitlines(keepends=True)
    bad = ['{"bad json\n', "[1, 2]\n", '{"user_id": "u1"}\n', "\xff\n"]
    dirty = tmp_path / "dirty.jsonl"
    dirty.write_bytes("".join(good[:10] + bad + good[10:]).encode("utf-8").replace("\xff".encode(), b"\xff"))
    clean = tmp_path / "clean" / "dirty.jsonl"  # the same base name: the same keys
    clean.parent.mkdir()
    clean.write_text("".join(good))

    builder, errors = prepare([str(dirty)], str(tmp_path / "beam"), 0.1, 0.0, ONE_WORKER)
    assert [(e.path, e.line) for e in errors] == [(str(dirty), n) for n in (11, 12, 13, 14)]
    assert "invalid JSON" in errors[0].reason and "expected a JSON object" in errors[1].reason
    assert "user" in errors[2].reason or "page" in errors[2].reason
    assert "not UTF-8" in errors[3].reason
    reference = PageLogDataset.for_files([str(clean)], str(tmp_path / "plain"), 0.1, 0.0)
    reference.download_and_prepare()
    for split in ("train", "validation"):
        assert _records(builder.as_data_source()[split]) == _records(reference.as_data_source()[split])

    vocabularies = []
    for path, data_dir in ((dirty, tmp_path / "beam"), (clean, tmp_path / "plain")):
        cfg = get_config().data
        cfg.page_logs, cfg.data_dir, cfg.validation_fraction, cfg.sentencepiece_vocab = str(path), str(data_dir), 0.1, 100
        cfg.source = resolve_source(cfg)
        prepared = prepare_data(cfg, str(data_dir), True, lambda name: None)
        vocab, counts, shelf_items = build_vocabulary(cfg, prepared)
        vocabularies.append((vocab.to_json(), counts, shelf_items))
    assert prepared.skipped == {} and vocabularies[0] == vocabularies[1]


def test_prepare_command_reports_errors_in_one_line(log_files, tmp_path, capsys):
    assert prepare_main(["--logs", str(tmp_path / "none-*.jsonl"), "--data_dir", str(tmp_path / "d")]) == 2
    assert "no page log file matches" in capsys.readouterr().err
    dirty = tmp_path / "dirty.jsonl"
    shutil.copy(log_files[1], dirty)
    with open(dirty, "a") as f:
        f.write('{"user_id": "u", "page": [{"shelf": "s", "items": "t1"}]}\n')
    line = len(open(dirty).read().splitlines())
    assert prepare_main(["--logs", str(dirty), "--data_dir", str(tmp_path / "strict"), "--strict", "--", *ONE_WORKER]) == 2
    ours = [x for x in capsys.readouterr().err.splitlines() if x.startswith("homegen prepare:")]
    assert len(ours) == 1 and f"dirty.jsonl:{line}: page[0].items must be a non-empty list" in ours[0]
    assert not PageLogDataset.for_files([str(dirty)], str(tmp_path / "strict")).is_prepared()  # nothing complete
    assert prepare_main(["--logs", str(dirty), "--data_dir", str(tmp_path / "lenient"), "--max_errors", "0",
                         "--", *ONE_WORKER]) == 1
    out = capsys.readouterr().out
    assert f"skipped {dirty}:{line}:" in out and "1 malformed line(s) skipped" in out and "--config.data.page_logs=" in out


def test_prepare_benchmark_times_both_methods_on_the_same_files(log_files, tmp_path, capsys):
    """A 600-page log tiled 4 times into 2,400 distinct pages in 3 files; both methods prepare them."""
    from scripts.benchmark_prepare import main

    assert main(["--tile", log_files[1], "--pages", "2400", "--files", "3", "--out", str(tmp_path),
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "2,400 pages in 3 file(s)" in out and "| builder |" in out and "| beam |" in out
    tiled = [json.loads(line) for path in sorted(glob.glob(str(tmp_path / "logs" / "*.jsonl"))) for line in open(path)]
    source = [json.loads(line) for line in open(log_files[1])]
    assert len(tiled) == 2400 and len({r["request_id"] for r in tiled}) == 2400
    span = max(r["timestamp"] for r in source) - min(r["timestamp"] for r in source) + 1
    assert tiled[1800]["timestamp"] == source[0]["timestamp"] + 3 * span and tiled[1800]["page"] == source[0]["page"]
    report = json.load(open(tmp_path / "prepare_benchmark.json"))
    assert [r["method"] for r in report["rows"]] == ["builder", "beam"]
    assert all(r["seconds"] > 0 and r["peak_rss"] > 0 for r in report["rows"])
    logs = sorted(glob.glob(str(tmp_path / "logs" / "*.jsonl")))
    for method in ("builder", "beam"):  # each wrote a complete dataset
        assert PageLogDataset.for_files(logs, str(tmp_path / method)).is_prepared()

"""Page logs prepared by an Apache Beam pipeline, for logs too large for one process or one machine's memory.

`BeamPageLogDataset` writes the same TFDS dataset as `PageLogDataset` (same folder, config name, keys, time
split, examples in the same order, array_record shards), so `train.py --config.data.page_logs=...` with the
same files opens it as already prepared.

The pipeline never holds the log, or a split of it, in one place: every large collection travels through
files (under the dataset's temporary folder), and Beam carries only file names, counts and an hourly
histogram of timestamps. So a worker's memory is bounded by one shard (`max_shard_bytes` of examples, 256 MiB
by default) and one write buffer, whatever the log's size, on the DirectRunner as on a cluster runner.

1. **Parse** (one input file per unit of work): each line is parsed and checked; a malformed one becomes
   `file:line: reason` in the errors output (or, with `strict`, fails the job); each page is serialized as
   TFDS serializes it and written to the file's spill with its key and timestamp. An hourly histogram of
   timestamps (pages and bytes per hour) goes on: its size is the log's span in hours, not its pages. The
   file's vocabulary counts (`LogCounts`) are saved beside its spill; merged in file order, they are written
   into the dataset's folder (`LOG_COUNTS_FILE`), and training builds its vocabulary from them.
2. **Plan**: the time cut-offs, exactly as the builder computes them (`time_cut_offs`: linear quantiles of
   every timestamp). The histogram says which hours hold the few sorted positions a quantile interpolates;
   one more read of the spills collects the timestamps of those hours alone, and the quantiles come from
   them. Then each split's shard count from its bytes.
3. **Bucket** (one spill per unit of work): each page goes to its split and to the shard its hashed key falls
   in. TFDS orders a split by the MD5 of its keys salted with the split's name; a shard is a range of that
   hash, so the shards read in order are the builder's order.
4. **Write** (one shard per unit of work): a shard's pages sorted by hash, written as array_record.

TFDS writes into a temporary folder and renames it when every split is written, so a failed run leaves
nothing that reads as complete.
"""

from __future__ import annotations

import bisect
import glob
import itertools
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tensorflow_datasets.core import writer as tfds_writer

from homegen.data.builders import (
    PageLogDataset,
    file_prefixes,
    page_log_files,
    page_log_to_example,
    serialize_page_example,
)
from homegen.data.formats import DataFormatError, json_object, parse_page_log
from homegen.data.log_counts import LOG_COUNTS_FILE, LogCounts
from homegen.data.splits import SPLITS, cut_off_quantiles, cut_offs_from_ranks, quantile_ranks, time_split, time_splits

BUFFER_BYTES = 64 << 20  # what the bucket stage buffers per worker before writing its pieces out
MAX_SHARD_BYTES = 256 << 20  # examples per shard, at most: what a worker holds while it sorts and writes one
HOUR = 3600.0  # the histogram's bin
_NO_TIME = float("nan")  # a page without a timestamp, in a spill


def _write_frames(path: str, frames: Iterable[tuple[bytes, bytes]]) -> None:
    """Writes (head, body) byte pairs to `path` (any Beam filesystem) as length-prefixed frames."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        for head, body in frames:
            f.write(struct.pack("<II", len(head), len(body)) + head + body)


def _read_frames(path: str, bodies: bool = True) -> Iterator[tuple[bytes, bytes | int]]:
    """The (head, body) pairs of a frame file; with `bodies=False`, (head, body size), bodies skipped."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        while header := f.read(8):
            head_size, body_size = struct.unpack("<II", header)
            head = f.read(head_size)
            if bodies:
                yield head, f.read(body_size)
            else:
                f.seek(body_size, os.SEEK_CUR)
                yield head, body_size


def _hour(stamp: float | None) -> float | None:
    return None if stamp is None else math.floor(stamp / HOUR)


def _stamp(head: bytes) -> float | None:
    (stamp,) = struct.unpack("<d", head[:8])
    return None if math.isnan(stamp) else stamp


def parse_file(entry: tuple[int, str, str], temp: str, strict: bool) -> Iterator:
    """Parses input file `entry = (index, path, key prefix)` into the spill `temp/parsed/INDEX`: one frame per
    page log, head = its timestamp (float64, NaN for none) and key (`prefix:k` for the k-th page log of the
    file, as `PageLogDataset` keys it), body = its serialized example. Yields the spill's path with its
    hourly histogram {hour: [pages, bytes]} (hour = floor(timestamp / 3600), None without one), and as a tagged
    `counts` output (index, path of the file's `LogCounts` as JSON); a malformed line becomes a tagged `errors`
    output (a JSON line: path, line, reason), or with `strict` fails the job."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems

    index, path, prefix = entry
    histogram: dict[float | None, list[int]] = {}
    errors: list[str] = []
    log_counts = LogCounts()

    def frames() -> Iterator[tuple[bytes, bytes]]:
        k = 0
        with FileSystems.open(path) as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    log = parse_page_log(json_object(raw, path, number), path, number)
                except DataFormatError as e:
                    if strict:
                        raise
                    errors.append(json.dumps({"path": e.path, "line": e.line, "reason": e.reason}))
                    continue
                log_counts.add_page(log)
                body = serialize_page_example(page_log_to_example(log))
                counts = histogram.setdefault(_hour(log.timestamp), [0, 0])
                counts[0] += 1
                counts[1] += len(body)
                stamp = _NO_TIME if log.timestamp is None else float(log.timestamp)
                yield struct.pack("<d", stamp) + f"{prefix}:{k}".encode(), body
                k += 1

    spill = FileSystems.join(temp, "parsed", f"{index:06d}")
    _write_frames(spill, frames())
    counts_path = FileSystems.join(temp, "counts", f"{index:06d}.json")
    _save_json(log_counts.to_json(), counts_path)
    for error in errors:
        yield beam.pvalue.TaggedOutput("errors", error)
    yield beam.pvalue.TaggedOutput("counts", (index, counts_path))
    yield spill, histogram


def merge_counts(entries: list[tuple[int, str]], path: str) -> None:
    """Merges the per-file counts `entries = [(file index, counts path)]` in file order (what training's
    vocabulary pass would count reading the files one after another) and saves the total at `path`."""
    from apache_beam.io.filesystems import FileSystems

    total = LogCounts()
    for _, counts_path in sorted(entries):
        with FileSystems.open(counts_path) as f:
            total.merge(LogCounts.from_json(json.loads(f.read())))
    _save_json(total.to_json(), path)


def merge_histograms(histograms: Iterable[dict]) -> dict:
    """The sum of hourly histograms ({hour: [pages, bytes]})."""
    total: dict = {}
    for histogram in histograms:
        for stamp, (pages, size) in histogram.items():
            counts = total.setdefault(stamp, [0, 0])
            counts[0] += pages
            counts[1] += size
    return total


def boundary_hours(histogram: dict, validation_fraction: float, test_fraction: float) -> list[float]:
    """The hours that hold the sorted timestamp positions the cut-off quantiles interpolate."""
    hours = sorted(h for h in histogram if h is not None)
    ends = list(itertools.accumulate(histogram[h][0] for h in hours))
    if not ends:
        return []
    quantiles = cut_off_quantiles(validation_fraction, test_fraction)
    ranks = {rank for q in quantiles for rank in quantile_ranks(ends[-1], q)}
    return sorted({hours[bisect.bisect_right(ends, rank)] for rank in ranks})


def boundary_pages(spill: str, hours: list[float]) -> Iterator[tuple[float, int]]:
    """(timestamp, bytes) of each page of a parse spill logged in one of `hours`."""
    wanted = set(hours)
    for head, size in _read_frames(spill, bodies=False):
        stamp = _stamp(head)
        if stamp is not None and _hour(stamp) in wanted:
            yield stamp, size


def plan_splits(histogram: dict, validation_fraction: float, test_fraction: float,
                boundary: list[tuple[float, int]], max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """The time cut-offs, exact (the hourly `histogram` ranks the `boundary` pages, every page of the hours
    `boundary_hours` named), and each split's shard count: its bytes over `max_shard_bytes`, rounded up (a
    shard is a range of hashed keys, so shards are even up to sampling noise). A split that would be empty is
    an error, as it is for TFDS's writers."""
    hours = sorted(h for h in histogram if h is not None)
    before = dict(zip(hours, itertools.accumulate([0] + [histogram[h][0] for h in hours[:-1]])))
    inside: dict[float, list[float]] = {}
    for stamp, _ in boundary:
        inside.setdefault(_hour(stamp), []).append(stamp)
    for stamps in inside.values():
        stamps.sort()

    def value_at(rank: int) -> float:
        hour = max(h for h in inside if before[h] <= rank)
        return inside[hour][rank - before[hour]]

    total = sum(histogram[h][0] for h in hours)
    cuts = cut_offs_from_ranks(total, value_at, validation_fraction, test_fraction) if total else (None, None)
    sizes = {split: [0, 0] for split in time_splits(validation_fraction, test_fraction)}
    for hour, (pages, size) in histogram.items():
        if hour not in inside:  # a whole hour on one side of every cut-off
            split = time_split(None if hour is None else hour * HOUR, *cuts)
            sizes[split][0] += pages
            sizes[split][1] += size
    for stamp, size in boundary:
        split = time_split(stamp, *cuts)
        sizes[split][0] += 1
        sizes[split][1] += size
    for split, (pages, _) in sizes.items():
        if not pages:
            shares = f"{1 - validation_fraction - test_fraction:g} / {validation_fraction:g} / {test_fraction:g}"
            raise ValueError(f"the {split} split would hold no page: the logs' timestamps cannot be split {shares}")
    return {"cuts": cuts, "shards": {split: min(pages, max(1, math.ceil(size / max_shard_bytes)))
                                     for split, (pages, size) in sizes.items()}}


def bucket_spill(spill: str, plan: dict, temp: str, buffer_bytes: int = BUFFER_BYTES) -> Iterator:
    """Sends each page of a parse spill to its split's shard: appended to the shard's folder
    `temp/buckets/SPLIT/SHARD/` as pieces of at most `buffer_bytes` per flush, head = the page's 128-bit hashed
    key (big-endian). Deletes the spill when done; yields ((split, shard), pages) for each shard it fed."""
    from apache_beam.io.filesystems import FileSystems

    hashers = {split: hashing.Hasher(split) for split in plan["shards"]}
    buffers: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}
    counts: dict[tuple[str, int], int] = {}
    name, piece, buffered = os.path.basename(spill), 0, 0

    def flush() -> None:
        nonlocal piece, buffered
        for (split, shard), frames in buffers.items():
            _write_frames(FileSystems.join(temp, "buckets", split, f"{shard:05d}", f"{name}-{piece:05d}"), frames)
        buffers.clear()
        piece, buffered = piece + 1, 0

    for head, body in _read_frames(spill):
        split = time_split(_stamp(head), *plan["cuts"])
        hkey = hashers[split].hash_key(head[8:])
        shard = tfds_shuffle.get_bucket_number(hkey, plan["shards"][split])
        buffers.setdefault((split, shard), []).append((hkey.to_bytes(16, "big"), body))
        counts[split, shard] = counts.get((split, shard), 0) + 1
        buffered += len(body) + 24
        if buffered >= buffer_bytes:
            flush()
    flush()
    FileSystems.delete([spill])
    yield from counts.items()


def write_shard(entry: tuple[tuple[str, int], int], non_empty: list[tuple[str, int]], temp: str,
                dataset: tuple[str, str, str]) -> tuple[str, int, int, int]:
    """Writes shard `entry = ((split, bucket), pages)` from its pieces, sorted by hashed key, as the split's
    file number (its rank among the split's non-empty buckets) of `dataset = (data path, dataset name, file
    suffix)`. Deletes the pieces; returns (split, shard index, pages, bytes)."""
    from apache_beam.io.filesystems import FileSystems

    (split, bucket), pages = entry
    ranks = sorted(b for s, b in non_empty if s == split)
    index = ranks.index(bucket)
    folder = FileSystems.join(temp, "buckets", split, f"{bucket:05d}")
    pieces = [m.path for m in FileSystems.match([FileSystems.join(folder, "*")])[0].metadata_list]
    examples = sorted((int.from_bytes(head, "big"), body) for path in pieces for head, body in _read_frames(path))
    if len(examples) != pages:
        raise RuntimeError(f"shard {split}/{bucket} holds {len(examples)} pages, {pages} were sent to it")
    data_path, name, suffix = dataset
    template = tfds.core.naming.ShardedFileTemplate(data_dir=data_path, dataset_name=name, split=split,
                                                    filetype_suffix=suffix)
    path = template.sharded_filepath(shard_index=index, num_shards=len(ranks))
    tfds_writer.ExampleWriter(tfds.core.FileFormat.ARRAY_RECORD).write(path, examples)
    FileSystems.delete([folder])
    return split, index, pages, sum(len(body) for _, body in examples)


class BeamPageLogDataset(PageLogDataset, skip_registration=True):
    """`PageLogDataset` written by a Beam pipeline (same name, so the same folder; see the module doc)."""

    name = "page_log_dataset"

    def __init__(self, *, errors_prefix: str, strict: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                 **kwargs):
        super().__init__(**kwargs)
        self.errors_prefix, self.strict, self.max_shard_bytes = errors_prefix, strict, max_shard_bytes

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        import apache_beam as beam

        cfg = self.builder_config
        temp = os.path.join(str(self.data_path), "beam_temp")  # inside TFDS's temporary folder
        files = [(k, path, prefix) for k, (path, prefix) in enumerate(zip(cfg.page_logs, file_prefixes(cfg.page_logs)))]
        dataset = (str(self.data_path), self.name, self.info.file_format.file_suffix)
        with beam.Pipeline(options=download_config.beam_options) as pipeline:
            parsed = (pipeline
                      | "Files" >> beam.Create(files)
                      | "Spread files" >> beam.Reshuffle()
                      | "Parse" >> beam.FlatMap(parse_file, temp, self.strict).with_outputs("errors", "counts",
                                                                                             main="spills"))
            _ = parsed.errors | "Write errors" >> beam.io.WriteToText(self.errors_prefix, file_name_suffix=".jsonl")
            _ = (parsed.counts
                 | "Collect counts" >> beam.combiners.ToList()
                 | "Merge counts" >> beam.Map(merge_counts, os.path.join(str(self.data_path), LOG_COUNTS_FILE)))
            fractions = (cfg.validation_fraction, cfg.test_fraction)
            histogram = (parsed.spills
                         | "Histograms" >> beam.Values()
                         | "Histogram" >> beam.CombineGlobally(merge_histograms))
            spills = parsed.spills | "Spills" >> beam.Keys() | "Spread spills" >> beam.Reshuffle()
            hours = beam.pvalue.AsSingleton(histogram | "Boundary hours" >> beam.Map(boundary_hours, *fractions))
            boundary = beam.pvalue.AsSingleton(spills
                                               | "Boundary pages" >> beam.FlatMap(boundary_pages, hours)
                                               | "Collect boundary" >> beam.combiners.ToList())
            plan = beam.pvalue.AsSingleton(
                histogram | "Plan" >> beam.Map(plan_splits, *fractions, boundary, self.max_shard_bytes))
            shards = (spills
                      | "Bucket" >> beam.FlatMap(bucket_spill, plan, temp, min(BUFFER_BYTES, self.max_shard_bytes))
                      | "Count shards" >> beam.CombinePerKey(sum))
            non_empty = beam.pvalue.AsSingleton(shards | "Shard ids" >> beam.Keys() | beam.combiners.ToList())
            _ = (shards
                 | "Spread shards" >> beam.Reshuffle()
                 | "Write shards" >> beam.Map(write_shard, non_empty, temp, dataset)
                 | "Shard infos" >> beam.combiners.ToList()
                 | "Save shard infos" >> beam.Map(_save_json, os.path.join(temp, "shards.json")))
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(os.path.join(temp, "shards.json")) as f:
            written = json.load(f)
        FileSystems.delete([temp])
        split_infos = []
        for split in SPLITS:
            rows = sorted((index, pages, size) for s, index, pages, size in written if s == split)
            if rows:
                split_infos.append(tfds.core.SplitInfo(
                    name=split, shard_lengths=[pages for _, pages, _ in rows], num_bytes=sum(r[2] for r in rows),
                    filename_template=self._get_filename_template(split)))
        self.info.set_splits(tfds.core.SplitDict(split_infos))


def _save_json(value, path: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        f.write(json.dumps(value).encode())


def errors_folder(data_dir: str, config_name: str) -> str:
    """Where `prepare` lists the malformed lines it skipped for the dataset `config_name` of `data_dir`."""
    return os.path.join(data_dir, "prepare_errors", config_name)


def skipped_lines(data_dir: str, config_name: str) -> list[DataFormatError]:
    """The malformed lines `prepare` skipped for that dataset (none when it was not prepared by `prepare`)."""
    paths = sorted(glob.glob(os.path.join(errors_folder(data_dir, config_name), "errors*.jsonl")))
    records = [json.loads(line) for path in paths for line in open(path, encoding="utf-8")]
    return sorted((DataFormatError(r["path"], r["line"], r["reason"]) for r in records), key=lambda e: (e.path, e.line))


def prepare(patterns: Sequence[str], data_dir: str, validation_fraction: float = 0.05, test_fraction: float = 0.0,
            beam_flags: Sequence[str] = (), strict: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES
            ) -> tuple[PageLogDataset, list[DataFormatError]]:
    """Prepares the page logs of `patterns` (files or globs) with Beam into `data_dir`, as `PageLogDataset`
    would. Returns the dataset's builder (ready for `as_data_source`) and the malformed lines skipped (also
    listed in `errors_folder`, where training's vocabulary pass skips them too). `beam_flags` are Beam
    pipeline options (`--runner=...` with its own options; default: the DirectRunner on every core here);
    `max_shard_bytes` bounds a shard, and so what one worker holds."""
    import apache_beam as beam

    paths = page_log_files(patterns)
    flags = list(beam_flags)
    if not any(f.startswith("--runner") for f in flags):
        flags += ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                  f"--direct_num_workers={os.cpu_count() or 1}"]
    builder = PageLogDataset.for_files(paths, data_dir, validation_fraction, test_fraction)
    name = builder.builder_config.name
    if not builder.is_prepared():  # else its dataset and its errors are those of the run that prepared it
        shutil.rmtree(errors_folder(data_dir, name), ignore_errors=True)
        beam_builder = BeamPageLogDataset(config=builder.builder_config, data_dir=data_dir,
                                          file_format="array_record", strict=strict, max_shard_bytes=max_shard_bytes,
                                          errors_prefix=os.path.join(errors_folder(data_dir, name), "errors"))
        beam_builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            beam_options=beam.options.pipeline_options.PipelineOptions(flags)))
    # A builder opened after the pipeline wrote the dataset reads its splits (the one above predates them).
    return PageLogDataset.for_files(paths, data_dir, validation_fraction, test_fraction), skipped_lines(data_dir, name)

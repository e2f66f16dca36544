"""Page logs prepared by an Apache Beam pipeline, for logs too large for one process.

`BeamPageLogDataset` writes the same TFDS dataset as `PageLogDataset` (same folder, config name, keys, time
split and array_record shards), so `train.py --config.data.page_logs=...` with the same files opens it as
already prepared. The work is spread by the Beam runner: each input file is parsed by one worker, lines
that are not page logs are collected as `file:line: reason` (or, with `strict`, fail the job), the time
cut-offs are computed exactly from a histogram of timestamps (its size is the number of distinct
timestamps, not of pages), and TFDS's Beam writer shuffles and shards each split. TFDS writes into a
temporary folder and renames it when every split is written, so a failed run leaves nothing that reads as
complete.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Iterator, Sequence

from homegen.data.builders import PageLogDataset, file_prefixes, page_log_files, page_log_to_example
from homegen.data.formats import DataFormatError, json_object, parse_page_log
from homegen.data.splits import time_cut_offs, time_split


def parse_file(entry: tuple[str, str], strict: bool) -> Iterator:
    """(key, timestamp, example) for each page log of file `entry = (path, key prefix)`, keyed as
    `PageLogDataset` keys them (`prefix:k` for the k-th page log of the file); a malformed line becomes a tagged
    `errors` output (a JSON line: path, line, reason), or with `strict` fails the job."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems

    path, prefix = entry
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
                yield beam.pvalue.TaggedOutput("errors", json.dumps({"path": e.path, "line": e.line, "reason": e.reason}))
                continue
            yield f"{prefix}:{k}", log.timestamp, page_log_to_example(log)
            k += 1


def _in_split(page: tuple, cuts: tuple[float | None, float | None], split: str) -> bool:
    return time_split(page[1], *cuts) == split


def _cuts(histogram: list[tuple[float, int]], validation_fraction: float, test_fraction: float):
    return time_cut_offs(dict(histogram), validation_fraction, test_fraction)


class BeamPageLogDataset(PageLogDataset, skip_registration=True):
    """`PageLogDataset` written by a Beam pipeline (same name, so the same folder; see the module doc)."""

    name = "page_log_dataset"

    def __init__(self, *, errors_prefix: str, strict: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.errors_prefix, self.strict = errors_prefix, strict

    def _split_generators(self, dl_manager, pipeline):
        import apache_beam as beam

        cfg = self.builder_config
        parsed = (pipeline
                  | "Files" >> beam.Create(list(zip(cfg.page_logs, file_prefixes(cfg.page_logs))))
                  | "Spread files" >> beam.Reshuffle()
                  | "Parse" >> beam.FlatMap(parse_file, self.strict).with_outputs("errors", main="pages"))
        pages = parsed.pages
        _ = parsed.errors | "Write errors" >> beam.io.WriteToText(self.errors_prefix, file_name_suffix=".jsonl")
        cuts = (pages
                | "Timestamps" >> beam.FlatMap(lambda page: [] if page[1] is None else [page[1]])
                | "Count timestamps" >> beam.combiners.Count.PerElement()
                | "Histogram" >> beam.combiners.ToList()
                | "Cut-offs" >> beam.Map(_cuts, cfg.validation_fraction, cfg.test_fraction))
        splits = ["train"] + (["validation"] if cfg.validation_fraction else []) + (["test"] if cfg.test_fraction else [])
        return {split: (pages
                        | f"Select {split}" >> beam.Filter(_in_split, beam.pvalue.AsSingleton(cuts), split)
                        | f"Examples {split}" >> beam.Map(lambda page: (page[0], page[2])))
                for split in splits}


def errors_folder(data_dir: str, config_name: str) -> str:
    """Where `prepare` lists the malformed lines it skipped for the dataset `config_name` of `data_dir`."""
    return os.path.join(data_dir, "prepare_errors", config_name)


def skipped_lines(data_dir: str, config_name: str) -> list[DataFormatError]:
    """The malformed lines `prepare` skipped for that dataset (none when it was not prepared by `prepare`)."""
    paths = sorted(glob.glob(os.path.join(errors_folder(data_dir, config_name), "errors*.jsonl")))
    records = [json.loads(line) for path in paths for line in open(path, encoding="utf-8")]
    return sorted((DataFormatError(r["path"], r["line"], r["reason"]) for r in records), key=lambda e: (e.path, e.line))


def prepare(patterns: Sequence[str], data_dir: str, validation_fraction: float = 0.05, test_fraction: float = 0.0,
            beam_flags: Sequence[str] = (), strict: bool = False) -> tuple[PageLogDataset, list[DataFormatError]]:
    """Prepares the page logs of `patterns` (files or globs) with Beam into `data_dir`, as `PageLogDataset`
    would. Returns the dataset's builder (ready for `as_data_source`) and the malformed lines skipped (also
    listed in `errors_folder`, where training's vocabulary pass skips them too). `beam_flags` are Beam
    pipeline options (`--runner=...` with its own options; default: the DirectRunner on every core here)."""
    import apache_beam as beam
    import tensorflow_datasets as tfds

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
                                          file_format="array_record", strict=strict,
                                          errors_prefix=os.path.join(errors_folder(data_dir, name), "errors"))
        beam_builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            beam_options=beam.options.pipeline_options.PipelineOptions(flags)))
    # A builder opened after the pipeline wrote the dataset reads its splits (the one above predates them).
    return PageLogDataset.for_files(paths, data_dir, validation_fraction, test_fraction), skipped_lines(data_dir, name)

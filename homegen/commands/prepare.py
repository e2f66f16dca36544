"""Prepares page logs (FORMATS.md §3) for training with an Apache Beam pipeline: parsed and checked, split by
time, shuffled and written as the array_record dataset that `train.py` reads (data/beam_prepare.py).

    homegen prepare --logs 'LOGS/*.jsonl' --data_dir DATA [--validation_fraction 0.05] [--test_fraction 0] \
        [--strict] [--max_shard_mib 256] [-- BEAM PIPELINE OPTIONS]

Then train on it with the same files and folder (the dataset is opened, not rebuilt):

    python train.py --config ... --config.data.page_logs='LOGS/*.jsonl' --config.data.data_dir=DATA

By default the pipeline runs on this machine (Beam's DirectRunner, one worker per core; a file is one unit of
work, so give a large log as many files). The log is never held in memory: it moves between the stages
through files in the dataset's temporary folder, and a worker holds at most one shard (--max_shard_mib) and a
64 MiB buffer. Beam options after `--` choose another runner, e.g.
`-- --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp` (Dataflow),
`-- --runner=FlinkRunner --flink_master=HOST:8081` or `-- --runner=SparkRunner --spark_master_url=...`,
with the inputs and DATA on storage the workers reach. Malformed lines are skipped and listed
(`file:line: reason`; DATA/prepare_errors/); with --strict the first one fails the job.
Exit status: 0 when the dataset is written; 1 when lines were skipped with --max_errors exceeded; 2 for bad
arguments, no matching file, or a failed pipeline (nothing is left that `train.py` would read as complete).
"""

from __future__ import annotations

import argparse
import sys
import time

from homegen.data.beam_prepare import prepare


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", action="append", required=True,
                        help="a page log file or glob (repeatable); files are read in the order given, globs sorted")
    parser.add_argument("--data_dir", required=True, help="the dataset folder (train.py's data.data_dir)")
    parser.add_argument("--validation_fraction", type=float, default=0.05, help="the newest pages held out")
    parser.add_argument("--test_fraction", type=float, default=0.0)
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed line")
    parser.add_argument("--max_shard_mib", type=float, default=256,
                        help="the largest shard (MiB of examples): what one worker holds while writing it")
    parser.add_argument("--max_errors", type=int, default=None,
                        help="exit 1 (the dataset is still written) when more lines than this were malformed")
    args = parser.parse_args(argv)
    if not (0 <= args.validation_fraction < 1 and 0 <= args.test_fraction < 1
            and args.validation_fraction + args.test_fraction < 1):
        parser.error("--validation_fraction and --test_fraction must be in [0, 1) with a sum below 1")
    if args.max_shard_mib <= 0:
        parser.error(f"--max_shard_mib must be positive, got {args.max_shard_mib}")
    start = time.perf_counter()
    try:
        builder, errors = prepare(args.logs, args.data_dir, args.validation_fraction, args.test_fraction,
                                  beam_flags, args.strict, int(args.max_shard_mib * 2**20))
    except FileNotFoundError as e:
        print(f"homegen prepare: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the runner's failure (a malformed line with --strict, a runner that cannot start)
        print(f"homegen prepare: error: the pipeline failed: {_first_line(e)}", file=sys.stderr)
        return 2
    splits = {name: split.num_examples for name, split in builder.info.splits.items()}
    print(f"prepared {builder.data_dir} in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{name} {n:,}" for name, n in splits.items()))
    for line in errors[:10]:
        print(f"skipped {line}")
    if errors:
        print(f"{len(errors):,} malformed line(s) skipped; all in {args.data_dir}/prepare_errors/")
    print("train on it with: --config.data.page_logs=" + ",".join(args.logs) + f" --config.data.data_dir={args.data_dir}")
    return 1 if args.max_errors is not None and len(errors) > args.max_errors else 0


def _first_line(error: Exception) -> str:
    """Beam wraps a worker's exception in its own text: the line that names the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "DataFormatError" in line or ".jsonl:" in line]
    return (named or lines or [type(error).__name__])[-1][:500]

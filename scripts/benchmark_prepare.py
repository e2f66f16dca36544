"""Page-log preparation side by side: train.py's in-process builder against `homegen prepare`'s Beam pipeline
(the DirectRunner with --workers processes), on the same files, each in a fresh process; wall time, pages/s
and the peak memory of its whole process tree (sampled every 0.2 s).

    python scripts/benchmark_prepare.py --logs 'LOGS/*.jsonl' --out DIR [--workers 2] [--methods builder,beam]

A log of any size for it: `--tile LOG --pages N [--files 16]` first writes N pages to OUT/logs/part-*.jsonl by
repeating LOG (a world's pages.jsonl, say), each repetition with its request ids suffixed `~c` and its
timestamps shifted past the previous one's, so every page is distinct and the time split stays meaningful;
the measurement then runs on those files (`--logs` is not needed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil

from homegen.data.builders import page_log_files

RUNS = {
    "builder": "from homegen.data.builders import PageLogDataset\n"
               "PageLogDataset.for_files({paths}, {out}).download_and_prepare()",
    "beam": "from homegen.data.beam_prepare import prepare\n"
            "prepare({paths}, {out}, beam_flags=['--runner=DirectRunner', '--direct_running_mode=multi_processing',"
            " '--direct_num_workers={workers}'])",
}


def measure(code: str) -> tuple[float, int]:
    """Seconds and peak total RSS (bytes) of `code` run by a fresh Python with its children."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"preparation failed: {process.stderr.read().decode()[-2000:]}")
    return seconds, peak


def tile_log(source: str, pages: int, files: int, folder: str) -> list[str]:
    """Writes `pages` page logs as `files` JSON Lines files in `folder` by repeating `source` (streamed:
    nothing is held but a line); returns their paths."""
    stamps = [t for line in open(source, "rb") if line.strip() and (t := json.loads(line).get("timestamp")) is not None]
    span = max(stamps) - min(stamps) + 1 if stamps else 0

    def repeated() -> Iterator[str]:
        for copy in itertools.count():
            for line in open(source, "rb"):
                if line.strip():
                    record = json.loads(line)
                    if record.get("request_id"):
                        record["request_id"] = f"{record['request_id']}~{copy}"
                    if record.get("timestamp") is not None:
                        record["timestamp"] += copy * span
                    yield json.dumps(record) + "\n"

    os.makedirs(folder, exist_ok=True)
    lines, paths = repeated(), []
    for k in range(files):
        paths.append(os.path.join(folder, f"part-{k:05d}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(itertools.islice(lines, pages * (k + 1) // files - pages * k // files))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", action="append", help="page log files or globs")
    parser.add_argument("--tile", metavar="LOG", help="write --pages pages by repeating this page log (see above)")
    parser.add_argument("--pages", type=int, help="with --tile: how many pages")
    parser.add_argument("--files", type=int, default=16, help="with --tile: into how many files")
    parser.add_argument("--out", required=True, help="a scratch folder (each method's dataset is written there)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--methods", default="builder,beam")
    args = parser.parse_args(argv)
    if bool(args.logs) == bool(args.tile) or bool(args.tile) != bool(args.pages):
        parser.error("give --logs, or --tile LOG with --pages N")
    try:
        paths = tile_log(args.tile, args.pages, args.files, os.path.join(args.out, "logs")) if args.tile \
            else page_log_files(args.logs)
    except FileNotFoundError as e:
        print(f"benchmark_prepare.py: error: {e}", file=sys.stderr)
        return 2
    pages = sum(1 for path in paths for line in open(path, "rb") if line.strip())
    size = sum(os.path.getsize(p) for p in paths)
    print(f"{pages:,} pages in {len(paths)} file(s), {size / 2**30:.2f} GiB; Beam workers {args.workers}")
    print("| method | seconds | pages/s | peak RSS (process tree) | time against the builder |")
    print("| --- | --- | --- | --- | --- |")
    rows, base = [], None
    for method in args.methods.split(","):
        out = os.path.join(args.out, method)
        shutil.rmtree(out, ignore_errors=True)
        code = RUNS[method].format(paths=json.dumps(paths), out=repr(out), workers=args.workers)
        seconds, peak = measure(code)
        base = base or seconds
        rows.append({"method": method, "seconds": seconds, "pages_per_s": pages / seconds, "peak_rss": peak})
        print(f"| {method} | {seconds:.1f} | {pages / seconds:,.0f} | {peak / 2**30:.2f} GiB | {seconds / base:.2f}x |",
              flush=True)
    with open(os.path.join(args.out, "prepare_benchmark.json"), "w") as f:
        json.dump({"pages": pages, "files": len(paths), "bytes": size, "workers": args.workers, "rows": rows}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

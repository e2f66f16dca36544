"""Page-log preparation side by side: train.py's in-process builder against `homegen prepare`'s Beam pipeline
(the DirectRunner with --workers processes), on the same files, each in a fresh process; wall time, pages/s
and the peak memory of its whole process tree (sampled every 0.2 s).

    python scripts/benchmark_prepare.py --logs 'LOGS/*.jsonl' --out DIR [--workers 2] [--methods builder,beam]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", action="append", required=True, help="page log files or globs")
    parser.add_argument("--out", required=True, help="a scratch folder (each method's dataset is written there)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--methods", default="builder,beam")
    args = parser.parse_args(argv)
    try:
        paths = page_log_files(args.logs)
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

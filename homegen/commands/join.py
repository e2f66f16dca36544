"""Joins a server's impression logs with the outcome events sent for them into page logs (FORMATS.md §3)
that `train.py --config.data.page_logs=` and `scripts/ope.py --logs` read.

    homegen join --impressions LOGS [--events EVENTS] --output pages.jsonl

LOGS is the folder given to `serve.py --impressions`; events are read from the same folder unless --events
names another. Each page's `streams` counts the "stream" events of its request id and item (0 where none).
Exit status: 0 on success; 2 when a folder is missing or a log line is malformed (the message names the
file and line); an unterminated last line of a file (a crash mid-write) is skipped with a warning.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from homegen.data.formats import DataFormatError
from homegen.serving.impressions import join_logs, log_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impressions", required=True, help="the folder of impressions-*.jsonl files")
    parser.add_argument("--events", default=None, help="the folder of events-*.jsonl files (default: --impressions)")
    parser.add_argument("--output", required=True, help="page logs (JSON Lines) to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for folder in (args.impressions, args.events):
        if folder is not None and not os.path.isdir(folder):
            print(f"homegen join: error: {folder} is not a folder", file=sys.stderr)
            return 2
    if not log_files(args.impressions, "impressions"):
        print(f"homegen join: error: no impressions-*.jsonl files in {args.impressions}", file=sys.stderr)
        return 2
    try:
        summary = join_logs(args.impressions, args.events, args.output)
    except DataFormatError as e:
        print(f"homegen join: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {summary.pages:,} pages, {summary.with_events:,} with events, {summary.streams:,} "
          f"streams; {summary.events_without_impression:,} request id(s) with events but no impression")
    return 0


if __name__ == "__main__":
    sys.exit(main())

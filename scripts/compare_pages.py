"""Paired comparison of two checkpoints' page quality on the same requests, from the results.json files that
`scripts/evaluate.py` wrote for each (same --split and --max_users): the mean difference in exact expected
streams per page and its standard error, per method.

    python scripts/compare_pages.py RUN_A/eval/results.json RUN_B/eval/results.json [--method NAME]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b - a and its standard error."""
    diff = np.asarray(b) - np.asarray(a)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="results.json of the first checkpoint")
    parser.add_argument("b", help="results.json of the second")
    parser.add_argument("--method", action="append", help="page methods to compare (default: every one in both)")
    args = parser.parse_args(argv)
    results = []
    for path in (args.a, args.b):
        try:
            with open(path) as f:
                results.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            print(f"compare_pages.py: error: cannot read {path}: {e}", file=sys.stderr)
            return 2
    a, b = results
    if "pages" not in a or "pages" not in b:
        print("compare_pages.py: error: both files must hold a page table (evaluate.py on a synthetic-world run)",
              file=sys.stderr)
        return 2
    if (a["request_split"], a["requests"]) != (b["request_split"], b["requests"]):
        print(f"compare_pages.py: error: different requests ({a['request_split']} x {a['requests']} against "
              f"{b['request_split']} x {b['requests']})", file=sys.stderr)
        return 2
    methods = args.method or [m for m in a["pages"] if m in b["pages"] and "per_request" in a["pages"][m]]
    print(f"{a['requests']} {a['request_split']} requests; B - A in expected streams per page")
    print(f"{'method':<36}{'A':>9}{'B':>9}{'B - A':>9}{'+- se':>9}")
    for method in methods:
        if method not in a["pages"] or method not in b["pages"]:
            print(f"compare_pages.py: error: {method!r} is not in both files", file=sys.stderr)
            return 2
        ra, rb = a["pages"][method], b["pages"][method]
        mean, se = paired(ra["per_request"], rb["per_request"])
        print(f"{method:<36}{ra['expected_streams']:>9.3f}{rb['expected_streams']:>9.3f}{mean:>+9.3f}{se:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

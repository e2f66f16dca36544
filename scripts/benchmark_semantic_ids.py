"""Time and memory of building semantic item IDs for a catalog of any size, phase by phase, and how well the
codes group similar items.

    python scripts/benchmark_semantic_ids.py --catalog W/catalog.jsonl --pages W/pages.jsonl \
        [--max_pages 200000] [--fit_items 1000000] [--levels 3] [--codes 256] [--dim 64]

The catalog is read streaming into arrays (`data/semantic_catalog.py`); co-occurrence comes from the first
`--max_pages` logged pages (history and items in page order, as training reads them); the codes are
fitted on at most `--fit_items` items and every other item is coded from its metadata. A catalog of
7 x 10^7 items: `scripts/simulate.py --out DIR --items 70000000 --catalog_only`. Prints the seconds and
peak RSS after each phase, then, on a sample of items, the share whose first code's most common genre is
their own (for the fit set, for the metadata-coded rest, and for the catalog's most common genre alone).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time

import numpy as np

from homegen.data.formats import iter_catalog, iter_page_logs
from homegen.data.semantic_catalog import CatalogCodes, CatalogColumns, build_catalog_codes, read_catalog_columns
from homegen.data.semantic_ids import packed_keys
from homegen.data.text import load_sentencepiece, train_sentencepiece


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--pages", default="", help="page logs for co-occurrence (none: metadata only)")
    parser.add_argument("--max_pages", type=int, default=200_000)
    parser.add_argument("--max_history", type=int, default=30)
    parser.add_argument("--fit_items", type=int, default=1_000_000)
    parser.add_argument("--sentencepiece_items", type=int, default=200_000,
                        help="titles the sentencepiece model is trained on (the catalog's first)")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    start = last = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{name:<58}{now - last:>9.1f} s{now - start:>9.1f} s total   peak RSS {peak:6.2f} GiB", flush=True)
        last = now

    sequences = []
    if args.pages:
        for log in itertools.islice(iter_page_logs(args.pages), args.max_pages):
            sequences.append(log.history[-args.max_history:] + [i for s in log.page for i in s.items])
    texts = (item.text() for _, item in itertools.islice(iter_catalog(args.catalog), args.sentencepiece_items))
    pieces = load_sentencepiece(train_sentencepiece(texts, 1000))
    phase(f"read {len(sequences):,} pages; sentencepiece on {args.sentencepiece_items:,} titles")
    columns = read_catalog_columns(args.catalog, pieces.encode_as_pieces)
    phase(f"read {columns.num_items:,} catalog items ({len(columns.values):,} attribute values)")
    built = build_catalog_codes(columns, sequences, fit_items=args.fit_items, levels=args.levels,
                                codes=args.codes, dim=args.dim, progress=phase)
    distinct = len(np.unique(packed_keys(built.codes)))
    print(f"\n{columns.num_items:,} items, {distinct:,} distinct code tuples, level sizes "
          f"{(built.codes.max(axis=0) + 1).tolist()}, {time.perf_counter() - start:.0f} s in all")
    print_genre_purity(columns, built)
    return 0 if distinct == columns.num_items else 1


def print_genre_purity(columns: CatalogColumns, built: CatalogCodes, sample: int = 200_000) -> None:
    """The share of sampled items whose first code's most common genre is their own: for the fit set, the
    metadata-coded rest, and the catalog's most common genre alone (what codes that ignore genre give)."""
    is_genre = np.array([v.startswith("genre=") for v in columns.values])
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(columns.num_items, min(sample, columns.num_items), replace=False))
    genre = np.array([next((int(a) for a in columns.attribute_ids[columns.offsets[r]:columns.offsets[r + 1]]
                            if is_genre[a]), -1) for r in rows])
    first_code = built.codes[rows, 0]
    majority = {}
    for code in np.unique(first_code):
        values, counts = np.unique(genre[first_code == code], return_counts=True)
        majority[int(code)] = values[counts.argmax()]
    agrees = np.array([majority[int(c)] == g for c, g in zip(first_code, genre)])
    in_fit = np.isin(rows, built.fit_rows)
    print(f"\nitems whose first code's most common genre is their own ({len(rows):,} sampled):")
    print(f"{'fit set':<28}{agrees[in_fit].mean() if in_fit.any() else float('nan'):>8.3f}  ({in_fit.sum():,} items)")
    print(f"{'coded from metadata':<28}{agrees[~in_fit].mean() if (~in_fit).any() else float('nan'):>8.3f}  "
          f"({(~in_fit).sum():,} items)")
    print(f"{'most common genre alone':<28}{np.unique(genre, return_counts=True)[1].max() / len(genre):>8.3f}")


if __name__ == "__main__":
    sys.exit(main())

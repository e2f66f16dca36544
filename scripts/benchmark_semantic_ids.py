"""Time and memory of building semantic item IDs for a catalog, phase by phase, as training builds them.

    python scripts/benchmark_semantic_ids.py --pages W/pages.jsonl --catalog W/catalog.jsonl \
        [--max_pages 200000] [--levels 3] [--codes 256] [--dim 64]

Reads the catalog and the first `--max_pages` logged pages (history and items in page order, as
`training/data.py` does for `data.semantic_max_sequences`), then runs `build_semantic_items` and prints the
seconds and peak RSS after each of its phases: co-occurrence PMI, metadata attributes, randomised SVD,
residual k-means, the tokenizer.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from homegen.data.formats import iter_page_logs, read_catalog
from homegen.data.semantic_ids import build_semantic_items, catalog_attributes
from homegen.data.text import load_sentencepiece, train_sentencepiece


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", required=True)
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--max_pages", type=int, default=200_000)
    parser.add_argument("--max_history", type=int, default=30)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    start = last = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{name:<44}{now - last:>9.1f} s{now - start:>9.1f} s total   peak RSS {peak:6.2f} GiB", flush=True)
        last = now

    catalog = read_catalog(args.catalog)
    item_ids = list(catalog)
    sequences = []
    for log in iter_page_logs(args.pages):
        sequences.append(log.history[-args.max_history:] + [i for s in log.page for i in s.items])
        if len(sequences) == args.max_pages:
            break
    pieces = load_sentencepiece(train_sentencepiece((item.text() for item in catalog.values()), 1000))
    attributes = catalog_attributes(catalog, pieces.encode_as_pieces)
    phase(f"read {len(item_ids):,} items, {len(sequences):,} pages; sentencepiece")
    build_semantic_items(item_ids, sequences, attributes, levels=args.levels, codes=args.codes, dim=args.dim,
                         progress=phase)
    return 0


if __name__ == "__main__":
    sys.exit(main())

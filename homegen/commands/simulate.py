"""Writes the synthetic Home-page world's catalog, page logs and held-out requests (FORMATS.md §5),
and prints the expected engagement of the logging policy, a popularity page, random pages and the
oracle on held-out requests.

    python scripts/simulate.py --out DIR [--items N] [--users U] [--pages P] [--seed S] [--propensities]
    python scripts/simulate.py --out DIR --items 70000000 --catalog_only

With --catalog_only only catalog.jsonl is written (the same catalog as the world of that seed and size):
for catalogs too large to simulate users over, such as the 7 x 10^7 tracks of a streaming service
(about 12 GB; `scripts/benchmark_semantic_ids.py` codes it).

With --propensities the logging policy is the Plackett-Luce one (full shelves) and every page log carries
its propensities (FORMATS.md §3), for off-policy evaluation (scripts/ope.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

from homegen.data.simulator.policies import policy_engagement
from homegen.data.simulator.simulate import write_catalog, write_world
from homegen.data.simulator.world import Catalog, WorldConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=None, help="default: pages / 20, at least 100")
    parser.add_argument("--pages", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=1_000, help="held-out requests to write")
    parser.add_argument("--eval-requests", type=int, default=200,
                        help="held-out requests on which to compare policies (0 to skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--propensities", action="store_true",
                        help="log with the Plackett-Luce policy and write its propensities")
    parser.add_argument("--catalog_only", action="store_true", help="write catalog.jsonl only")
    args = parser.parse_args(argv)
    users = args.users if args.users is not None else max(100, args.pages // 20)
    try:
        config = WorldConfig(num_items=args.items, num_users=users, seed=args.seed)
        if args.pages < 0 or args.requests < 1:
            raise ValueError("--pages must be >= 0 and --requests >= 1")
    except ValueError as e:
        print(f"simulate.py: {e}", file=sys.stderr)
        return 2
    start = time.time()
    if args.catalog_only:
        os.makedirs(args.out, exist_ok=True)
        path = write_catalog(Catalog(config, np.random.default_rng(config.seed)), args.out)
        print(f"wrote {args.items:,} items to {path} in {time.time() - start:.1f}s, peak memory "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
        return 0
    result = write_world(config, args.out, args.pages, args.requests,
                         progress=lambda n: print(f"  {n:,} pages ({time.time() - start:.0f}s)", flush=True),
                         propensities=args.propensities)
    elapsed = time.time() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {args.items:,} items, {users:,} users, {args.pages:,} pages, {args.requests:,} requests "
          f"to {args.out} in {elapsed:.1f}s ({args.pages / max(elapsed, 1e-9):,.0f} pages/s), "
          f"peak memory {peak_mib:,.0f} MiB")
    n = min(args.eval_requests, args.requests)
    if n > 0:
        users_, ctx, history = result["requests"]
        logged = result["logged"]
        rows = np.arange(n)
        values = policy_engagement(result["simulator"].response, users_[rows], ctx.take(rows), history[rows],
                                   (logged.shelves[rows], logged.items[rows]), np.random.default_rng(args.seed),
                                   config.num_shelves, config.min_items, config.max_items)
        oracle = values["oracle"].mean()
        print(f"\nexpected streams per page on {n} held-out requests (exact, under the true response model)")
        print(f"{'policy':<16}{'streams':>10}{'of oracle':>11}")
        for name, v in values.items():
            print(f"{name:<16}{v.mean():>10.3f}{v.mean() / oracle:>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

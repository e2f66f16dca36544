"""What share of the oracle's page value the requests themselves allow: the oracle's greedy page search run
with each user's latent state estimated from the request's history (all factors, then one at a time), judged
under the world's true response model, on the same requests as `scripts/evaluate.py`.

    python scripts/page_ceiling.py --world WORLD_FOLDER [--split validation] [--max_users 200] [--out FILE]

WORLD_FOLDER is a folder written by scripts/simulate.py (world.json, requests.jsonl), e.g. a run's
tfds/downloads/world_small_seed0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from homegen.data.simulator.world import World
from homegen.evaluation.ceiling import as_rows, ceiling_table
from homegen.evaluation.ope import world_config_of
from homegen.evaluation.pages import WorldJudge, read_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a scripts/simulate.py folder")
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--max_users", type=int, default=200)
    parser.add_argument("--out", default=None, help="write the table and per-request values here (JSON)")
    args = parser.parse_args(argv)
    try:
        world = World(world_config_of(args.world))
        requests = read_split(os.path.join(args.world, "requests.jsonl"), args.max_users, args.split)
    except (FileNotFoundError, ValueError) as e:
        print(f"page_ceiling.py: error: {e}", file=sys.stderr)
        return 2
    judge = WorldJudge(world, requests)
    values = ceiling_table(judge.response, judge.users, judge.contexts, judge.history)
    rows = as_rows(values)
    print(f"{len(requests)} {args.split} requests of {args.world}; full shelves, exact expected streams per page")
    print(f"{'pages':<52}{'streams':>9}{'of oracle':>11}{'se of gap':>11}")
    for row in rows:
        print(f"{row['pages']:<52}{row['expected_streams']:>9.3f}{row['of_oracle']:>11.3f}{row['minus_oracle_se']:>11.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "per_request": {k: v.tolist() for k, v in values.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

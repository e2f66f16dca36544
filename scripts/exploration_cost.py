"""What exploration costs in expected streams: one sampled page per request at each temperature against the
checkpoint's beam search, on the same held-out requests of its synthetic world (exact values from the world's
response model), and the cost to the whole service of exploring a share of traffic at that temperature.

    python scripts/exploration_cost.py --checkpoint RUN [--temperatures 0.5,1.0] [--shares 0.01,0.05,0.1] \
        [--requests 200] [--split validation] [--seeds 2] [--out FILE]

serve.py --explore_share S --explore_temperature T serves that share of beam requests with that sampler and
logs its exact propensities (serving/traffic.py); this table is the price of those logs.
"""

from __future__ import annotations

import argparse
import json
import sys

from homegen.evaluation.exploration import exploration_cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder of a synthetic-world checkpoint")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--temperatures", default="0.5,1.0")
    parser.add_argument("--shares", default="0.01,0.05,0.1", help="exploration shares to price")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--seeds", type=int, default=2, help="sampled pages per request and temperature")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        temperatures = [float(t) for t in args.temperatures.split(",")]
        shares = [float(s) for s in args.shares.split(",")]
        table = exploration_cost(args.checkpoint, temperatures, args.requests, args.split, args.step,
                                 seeds=args.seeds)
    except (ValueError, FileNotFoundError) as e:
        print(f"exploration_cost.py: error: {e}", file=sys.stderr)
        return 2
    beam = table["beam"]
    print(f"{table['requests']} {table['split']} requests, full shelves; exact expected streams per page "
          f"(beam search, {table['objective']}: {beam['streams']:.3f} +- {beam['se']:.3f})")
    print("| temperature | streams per page | against beam (paired) | mean log-propensity | "
          + " | ".join(f"cost at {s:.0%} explored" for s in shares) + " |")
    print("| --- " * (4 + len(shares)) + "|")
    for temperature, row in table["temperatures"].items():
        costs = " | ".join(f"{s * row['diff']:+.4f} ({s * row['diff'] / beam['streams']:+.2%})" for s in shares)
        print(f"| {temperature:g} | {row['streams']:.3f} | {row['diff']:+.3f} +- {row['diff_se']:.3f} | "
              f"{row['log_propensity']:.1f} | {costs} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plays the synthetic world's users against a running homegen server over HTTP, day by day: each day's
requests come from the world (users drawn by activity, their current histories, that day's contexts), the
server's pages are judged by the world's response model, and what each user streamed and skipped goes back as
POST /v1/events, so the server's impression logs become an online experiment's data.

    python serve.py --checkpoint RUN --port 8080 --impressions LOGS [--experiment arms.json] &
    python scripts/online_world.py --url http://127.0.0.1:8080 --world WORLD --days 5 --requests_per_day 400
    homegen join --impressions LOGS --output pages.jsonl
    python scripts/experiment.py --logs pages.jsonl --experiment arms.json --days OUT/days.json

WORLD is the checkpoint's world folder (its world.json). --out gets days.json: each simulated day's first and
last timestamps, which scripts/experiment.py uses as the looks of its sequential test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from homegen.data.simulator.online import OnlineWorld
from homegen.evaluation.online import play_day
from homegen.evaluation.ope import world_config_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--world", required=True, help="the checkpoint's world folder (world.json)")
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--requests_per_day", type=int, default=400)
    parser.add_argument("--first_day", type=int, default=None, help="default: the day after the world's logs")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for days.json")
    args = parser.parse_args(argv)
    try:
        world = OnlineWorld(world_config_of(args.world), args.seed)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"online_world.py: error: {e}", file=sys.stderr)
        return 2
    first = world.world.config.now_day + 1 if args.first_day is None else args.first_day
    days = []
    for day in range(first, first + args.days):
        summary = play_day(world, args.url.rstrip("/"), day, args.requests_per_day, args.concurrency)
        days.append(summary)
        print(f"day {day}: {summary['pages']} pages ({summary['failed']} failed) in {summary['end'] - summary['start']:.1f} s; "
              f"streams per page {summary['streams_per_page']}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "days.json"), "w") as f:
            json.dump(days, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

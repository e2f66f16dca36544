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
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from homegen.data.simulator.online import OnlineWorld
from homegen.evaluation.ope import world_config_of


def post(url: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def play_day(world: OnlineWorld, url: str, day: int, size: int, concurrency: int) -> dict:
    """One day's traffic: pages requested, outcomes drawn and sent back. Returns the day's summary."""
    requests, state = world.requests(day, size)
    start = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda r: post(url + "/v1/pages", r), requests))
    pages = [body["page"] if status == 200 else None for status, body in answers]
    outcomes = world.outcomes(state, pages)
    events = [{"request_id": body["request_id"],
               "events": [{"item": i, "event": "stream"} for i in outcome["streamed"]]
               + [{"item": i, "event": "skip"} for i in outcome["skipped"]]}
              for (status, body), outcome in zip(answers, outcomes)
              if status == 200 and (outcome["streamed"] or outcome["skipped"])]
    for begin in range(0, len(events), 200):
        status, body = post(url + "/v1/events", events[begin:begin + 200])
        if status != 202:
            raise RuntimeError(f"POST /v1/events answered {status}: {body}")
    arms: dict[str, list[int]] = {}
    for (status, body), outcome in zip(answers, outcomes):
        if status == 200:
            arms.setdefault(body.get("arm") or "-", []).append(len(outcome["streamed"]))
    return {"day": day, "start": start, "end": time.time(), "pages": sum(p is not None for p in pages),
            "failed": sum(p is None for p in pages),
            "streams_per_page": {arm: float(np.mean(v)) for arm, v in sorted(arms.items())}}


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

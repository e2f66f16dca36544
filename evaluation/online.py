"""Playing the synthetic world's users against a running server over HTTP (scripts/online_world.py,
scripts/on_policy.py): one simulated day's requests, pages and outcome events."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from homegen.data.simulator.online import OnlineWorld


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
            "failed": sum(p is None for p in pages), "streams": sum(len(o["streamed"]) for o in outcomes),
            "streams_per_page": {arm: float(np.mean(v)) for arm, v in sorted(arms.items())}}

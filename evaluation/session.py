"""In-session regeneration on the synthetic world: a user is shown a page, streams and skips on it (drawn
from the world's response model), and asks again. The regenerated page (the request with its `session`
events, FORMATS.md §4) is compared, paired over requests, with the first page shown again (a page that
ignores the events), and with the page regenerated from the skips alone (they are excluded; the history is
not updated), all under the user's state after the events: streamed items are in the history, skipped items
lose stream probability. The last comparison isolates what the model's conditioning on the new history adds
to the exclusion rule."""

from __future__ import annotations

import time

import numpy as np

from homegen.evaluation.pages import WorldJudge, standard_error
from homegen.serving.requests import parse_request


def session_events(page: list[dict], streams: np.ndarray, skips: np.ndarray) -> list[dict]:
    """FORMATS.md §4 session events of one page, in page order, from its (shelves, items) stream and skip
    arrays."""
    events = []
    for s, shelf in enumerate(page):
        for k, item in enumerate(shelf["items"]):
            if streams[s, k]:
                events.append({"item": item, "event": "stream"})
            elif skips[s, k]:
                events.append({"item": item, "event": "skip"})
    return events


def _latencies(engine, requests: list) -> np.ndarray:
    """Seconds of each request served alone (batch size 1), timed on its second run so that no compilation
    of a new prompt width is counted (a server compiles its shapes at start-up)."""
    times = []
    for request in requests:
        engine.generate([request])
        start = time.perf_counter()
        engine.generate([request])
        times.append(time.perf_counter() - start)
    return np.array(times)


def regeneration_gain(engine, world, requests: list[dict], seed: int = 0, latency_requests: int = 20) -> dict:
    """Expected streams of regenerated pages against the first pages shown again, after one round of sampled
    events per request, with the paired difference and its standard error; and the latency of a cold
    request and of a regeneration (median and 90th percentile, one request at a time)."""
    cold = [parse_request(r) for r in requests]
    first = [response["page"] for response in engine.generate(cold)]
    before = WorldJudge(world, requests)
    batch = before.page_batch(first)
    streams, skips = before.response.sample_events(batch, np.random.default_rng(seed))
    sessions = [session_events(page, streams[k], skips[k]) for k, page in enumerate(first)]
    after = [{**r, "history": list(r.get("history", [])) + [e["item"] for e in s if e["event"] == "stream"]}
             for r, s in zip(requests, sessions)]
    judge = WorldJudge(world, after, skipped=[[e["item"] for e in s if e["event"] == "skip"] for s in sessions])
    again = [parse_request({**r, "session": s}) for r, s in zip(requests, sessions)]
    regenerated = [response["page"] for response in engine.generate(again)]
    skips_only = [parse_request({**r, "session": [e for e in s if e["event"] == "skip"]})
                  for r, s in zip(requests, sessions)]
    excluded_only = [response["page"] for response in engine.generate(skips_only)]
    stale = judge.slot_probabilities(first).sum(axis=(1, 2))
    fresh = judge.slot_probabilities(regenerated).sum(axis=(1, 2))
    without_history = judge.slot_probabilities(excluded_only).sum(axis=(1, 2))
    gain, from_history = fresh - stale, fresh - without_history
    timed = min(latency_requests, len(requests))
    cold_s, regen_s = _latencies(engine, cold[:timed]), _latencies(engine, again[:timed])
    return {
        "requests": len(requests),
        "events_per_session": float(np.mean([len(s) for s in sessions])),
        "streams_per_session": float(streams.sum(axis=(1, 2)).mean()),
        "skips_per_session": float(skips.sum(axis=(1, 2)).mean()),
        "first_page_before_events": float(before.response.expected_engagement(batch).mean()),
        "first_page_again": float(stale.mean()),
        "regenerated_page": float(fresh.mean()),
        "gain": float(gain.mean()), "gain_se": standard_error(gain),
        "skips_only_page": float(without_history.mean()),
        "gain_from_history": float(from_history.mean()), "gain_from_history_se": standard_error(from_history),
        "skipped_items_shown_again": float(np.mean([
            len({e["item"] for e in s if e["event"] == "skip"} & {i for shelf in page for i in shelf["items"]})
            for s, page in zip(sessions, regenerated)])),
        "latency_cold_ms": {"median": 1e3 * float(np.median(cold_s)), "p90": 1e3 * float(np.quantile(cold_s, 0.9))},
        "latency_regenerate_ms": {"median": 1e3 * float(np.median(regen_s)),
                                  "p90": 1e3 * float(np.quantile(regen_s, 0.9))},
        "prompt_tokens": {"cold": float(np.mean([len(engine.prompt(r.with_session())) for r in cold])),
                          "regenerate": float(np.mean([len(engine.prompt(r.with_session())) for r in again]))},
    }

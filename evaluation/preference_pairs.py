"""Preference pairs from a checkpoint's own pages: for each logged request, its beam search's pages (best
first) and `samples` sampled pages are ranked by a learned reward (the predicted streams of one or more value heads,
pessimistic by their disagreement), and the best and the worst form a pair (OneRec's recipe: the policy's
candidates, a reward model's ranking, DPO). It lives with the evaluation code because, like it, it drives
the serving engine; `training.preference` reads what it writes."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np

from homegen.data.formats import PageLog, iter_page_logs
from homegen.data.vocab import PAD
from homegen.serving.engine import PageEngine
from homegen.serving.requests import parse_request
from homegen.training.preference import PreferencePairs


def logged_requests(path: str, limit: int, num_shelves: int | None = None, items_per_shelf: int | None = None
                    ) -> list[dict]:
    """FORMATS.md §4 requests for the users and contexts of the first `limit` page logs of `path`, asking for
    `num_shelves` shelves of `items_per_shelf` items (default: the logged page's shape)."""
    requests = []
    for log in iter_page_logs(path):
        if len(requests) == limit:
            break
        requests.append(_request(log, num_shelves, items_per_shelf))
    return requests


def _request(log: PageLog, num_shelves: int | None, items_per_shelf: int | None) -> dict:
    sizes = [len(s.items) for s in log.page] or [1]
    request = {"user_id": log.user_id, "history": list(log.history), "context": dict(log.context),
               "num_shelves": num_shelves or max(len(log.page), 1),
               "min_items_per_shelf": items_per_shelf or min(sizes), "max_items_per_shelf": items_per_shelf or max(sizes)}
    if log.intent:
        request["intent"] = log.intent
    return request


def _distinct(pages: list[list[dict]]) -> list[list[dict]]:
    seen, out = set(), []
    for page in pages:
        key = tuple((s["shelf"], tuple(s["items"])) for s in page)
        if key not in seen:
            seen.add(key)
            out.append(page)
    return out


def page_rewards(reward_engines: list[PageEngine], scored: list[list[dict]], pessimism: float
                 ) -> tuple[np.ndarray, list[list[list[float]]]]:
    """From each reward model's scores of the same pages (`PageEngine.score`): (reward of each page, the mean
    predicted streams less `pessimism` x their standard deviation over the models; each page's per-item
    stream probabilities averaged over the models, shelf by shelf)."""
    for engine, per_engine in zip(reward_engines, scored, strict=True):
        failed = next((s["error"] for s in per_engine if "error" in s), None)
        if failed:
            raise ValueError(f"reward model {engine.path} cannot score a candidate page: {failed}")
    totals = np.array([[s["predicted_streams"] for s in per_engine] for per_engine in scored])  # (engines, pages)
    rewards = totals.mean(axis=0) - pessimism * totals.std(axis=0)
    probs = [[list(np.mean([s[k]["page"][j]["stream_probs"] for s in scored], axis=0))
              for j in range(len(scored[0][k]["page"]))] for k in range(len(scored[0]))]
    return rewards, probs


def _value_row(engine: PageEngine, body: list[int], probs: list[list[float]]) -> np.ndarray:
    """The stream probability of each item at its last token of `body`, -1 elsewhere."""
    out = np.full(len(body), -1.0, np.float32)
    ends = engine.item_ends(body)
    out[ends] = [p for shelf in probs for p in shelf]
    return out


def make_pairs(engine: PageEngine, reward_engines: list[PageEngine], requests: list[dict], samples: int = 8,
               pessimism: float = 0.0, min_gap: float = 0.0, batch_size: int = 64, seed: int = 0,
               report: Callable[[str], None] | None = None) -> tuple[PreferencePairs, dict]:
    """Pairs (best, worst candidate by `page_rewards`) for the requests whose candidates differ in reward by
    at least `min_gap`, with `engine`'s log-probability of each page as the reference; and statistics of
    the candidates (mean reward of the chosen, the rejected, the beam's best page and all candidates).
    `report` gets a progress line after each batch of requests."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    rows, stats = [], {"requests": 0, "chosen": [], "rejected": [], "beam": [], "candidates": [], "chosen_is_beam": 0}
    started = time.perf_counter()
    own = next((k for k, e in enumerate(reward_engines) if e is engine), None)  # its scores hold the log-probs
    for start in range(0, len(requests), batch_size):
        chunk = [parse_request(r) for r in requests[start:start + batch_size]]
        beam = engine.generate([dataclasses.replace(r, num_pages=r.beam_size) for r in chunk])
        sampled = engine.generate([dataclasses.replace(r, temperature=1.0, num_pages=samples, seed=seed + start + k)
                                   for k, r in enumerate(chunk)])
        stats["requests"] += len(chunk)
        per_request = []  # (request, its candidates), for requests with two or more distinct pages
        for request, b, s in zip(chunk, beam, sampled, strict=True):
            if "error" not in b and "error" not in s:
                pages = _distinct([p["page"] for p in b.get("pages", [b])] + [p["page"] for p in s.get("pages", [s])])
                if len(pages) > 1:
                    per_request.append((request, pages))
        # Every candidate of the chunk is scored in one pass per model.
        flat_requests = [r for r, pages in per_request for _ in pages]
        flat_pages = [page for _, pages in per_request for page in pages]
        if not flat_pages:
            continue
        scored = [e.score(flat_requests, flat_pages) for e in reward_engines]
        flat_rewards, flat_probs = page_rewards(reward_engines, scored, pessimism)
        flat_reference = scored[own] if own is not None else engine.score(flat_requests, flat_pages)
        offset = 0
        for request, candidates in per_request:
            span = slice(offset, offset + len(candidates))
            offset += len(candidates)
            rewards, probs, reference = flat_rewards[span], flat_probs[span], flat_reference[span]
            best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
            stats["beam"].append(rewards[0])
            stats["candidates"].append(rewards.mean())
            if rewards[best] - rewards[worst] < min_gap or best == worst:
                continue
            stats["chosen"].append(rewards[best])
            stats["rejected"].append(rewards[worst])
            stats["chosen_is_beam"] += best == 0
            prompt = engine.prompt(request)
            pair = []
            for k in (best, worst):
                body = engine.page_tokens(candidates[k])
                pair.append((prompt, body, _value_row(engine, body, probs[k]),
                             reference[k]["log_prob"]))
            rows.append(pair)
        if report:
            report(f"{stats['requests']:,} of {len(requests):,} requests, {len(rows):,} pairs, "
                   f"{time.perf_counter() - started:.0f} s")
    summary = {"requests": stats["requests"], "pairs": len(rows), "chosen_is_beam": stats["chosen_is_beam"],
               **{f"mean_reward_{k}": float(np.mean(stats[k])) if stats[k] else None
                  for k in ("chosen", "rejected", "beam", "candidates")}}
    if not rows:
        raise ValueError("no pair: every request's candidates were equally rewarded (or could not be decoded)")
    return _as_arrays(rows, engine, reward_engines, samples, pessimism, summary), summary


def _as_arrays(rows: list, engine: PageEngine, reward_engines: list[PageEngine], samples: int, pessimism: float,
               summary: dict) -> PreferencePairs:
    length = max(len(prompt) + len(body) for pair in rows for prompt, body, _, _ in pair)
    n = len(rows)
    tokens = np.full((n, 2, length), PAD, np.int32)
    page_mask, values = np.zeros((n, 2, length), np.float32), np.full((n, 2, length), -1.0, np.float32)
    lengths, ref = np.zeros((n, 2), np.int32), np.zeros((n, 2), np.float32)
    for i, pair in enumerate(rows):
        for j, (prompt, body, value_row, log_prob) in enumerate(pair):
            page = slice(len(prompt), len(prompt) + len(body))
            tokens[i, j, :len(prompt)], tokens[i, j, page] = prompt, body
            page_mask[i, j, page], values[i, j, page] = 1.0, value_row
            lengths[i, j], ref[i, j] = len(prompt) + len(body), log_prob
    data = engine.train_config["data"]
    meta = {"checkpoint": os.path.abspath(engine.path), "step": engine.step,
            "reward_models": [os.path.abspath(e.path) for e in reward_engines], "samples": samples,
            "pessimism": pessimism, "vocab_size": engine.vocab_size,
            "data_dir": data["data_dir"] or os.path.join(os.path.abspath(engine.path), "tfds"), **summary}
    return PreferencePairs(tokens, lengths, page_mask, values, ref, meta)

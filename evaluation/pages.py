"""Page quality on the synthetic world: exact expected engagement under the true response model for
homegen's pages and the baselines, validity, diversity, coverage and offline log metrics."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from homegen.data.builders import SyntheticWorldDataset
from homegen.data.simulator.policies import OraclePolicy, SamplingPolicy, popularity_pages, random_policy
from homegen.data.simulator.response import PageBatch, ResponseModel
from homegen.data.simulator.shelves import ShelfRules
from homegen.data.simulator.world import Contexts, World, parse_context
from homegen.serving.engine import PageEngine
from homegen.serving.requests import parse_request
from homegen.training.checkpoints import run_folder


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of per-request values (of paired differences, say)."""
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def world_folder(meta: dict, workdir: str) -> str:
    """The folder holding the simulated world files (requests.jsonl, heldout_pages.jsonl) of a run trained on
    the synthetic world, from its checkpoint metadata."""
    data = meta["config"]["data"]
    if data.get("world"):  # page logs served in a synthetic world
        return data["world"]
    builder = SyntheticWorldDataset(config=data["preset"], data_dir=data["data_dir"] or os.path.join(workdir, "tfds"))
    return builder.world_dir()


def engine_world_folder(engine: PageEngine) -> str:
    """The world files folder of the run a synthetic-world engine was loaded from."""
    return world_folder({"config": engine.train_config}, run_folder(engine.path))


def read_split(path: str, limit: int, split: str = "test") -> list[dict]:
    """The first `limit` records (split "test"), or the last `limit` (split "validation", where settings are
    chosen), which must not overlap the first."""
    with open(path) as f:
        lines = f.readlines()
    if split == "test":
        return [json.loads(line) for line in lines[:limit]]
    if 2 * limit > len(lines):
        raise ValueError(f"{path} has {len(lines)} requests: too few for {limit} validation requests disjoint from "
                         f"the first {limit} (the test requests)")
    return [json.loads(line) for line in lines[-limit:]]


class WorldJudge:
    """Exact expected streams of pages (lists of {"shelf", "items"}) for given requests (FORMATS.md §4
    objects), under the synthetic world's true response model; `skipped` holds, per request, the items the
    user skipped earlier in the session (the world lowers their stream probability)."""

    def __init__(self, world: World, requests: list[dict], rules: ShelfRules | None = None,
                 skipped: list[list[str]] | None = None):
        self.world, cfg = world, world.config
        self.response = ResponseModel(world, rules)
        self.rules = self.response.rules
        self.users = np.array([world.user_index(r["user_id"]) for r in requests])
        contexts = [parse_context(world.users, u, r.get("context", {})) for u, r in zip(self.users, requests)]
        self.contexts = Contexts(**{f.name: np.concatenate([getattr(c, f.name) for c in contexts])
                                    for f in dataclasses.fields(Contexts)})
        self.history = np.full((len(requests), cfg.history_len), -1, np.int32)
        for row, r in enumerate(requests):
            ids = [world.item_index(i) for i in r.get("history", [])][-cfg.history_len:]
            if ids:
                self.history[row, -len(ids):] = ids
        self.skipped = None
        if skipped is not None:
            self.skipped = np.full((len(requests), max(map(len, skipped), default=0) or 1), -1, np.int32)
            for row, items in enumerate(skipped):
                self.skipped[row, :len(items)] = [world.item_index(i) for i in items]

    def convert(self, page: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """A page as world indices, padded to (num_shelves, max_items) with -1."""
        cfg = self.world.config
        shelves = np.full(cfg.num_shelves, -1, np.int32)
        items = np.full((cfg.num_shelves, cfg.max_items), -1, np.int32)
        for s, shelf in enumerate(page[:cfg.num_shelves]):
            shelves[s] = self.rules.index.get(shelf["shelf"], -1)
            ids = [self.world.item_index(i) for i in shelf["items"][:cfg.max_items]]
            items[s, :len(ids)] = ids
        return shelves, items

    def batch(self, shelves: np.ndarray, items: np.ndarray) -> PageBatch:
        return PageBatch(self.users, self.contexts, self.history, shelves, items, self.skipped)

    def page_batch(self, pages: list[list[dict]]) -> PageBatch:
        """The world's batch of one page per request."""
        converted = [self.convert(p) for p in pages]
        return self.batch(np.stack([c[0] for c in converted]), np.stack([c[1] for c in converted]))

    def slot_probabilities(self, pages: list[list[dict]]) -> np.ndarray:
        """(R, shelves, items) each slot's probability of being streamed, one page per request."""
        return self.response.slot_probabilities(self.page_batch(pages))


def pointwise_pages(engine: PageEngine, requests: list, shelf_lists: list[list[str]], batch: int = 64,
                    head: str = "logits") -> list[list[dict]]:
    """The pointwise baseline: for each request and shelf, the same model's next-item scores right after
    the shelf token (the first item slot), slotted greedily (best unused eligible item first) into the
    given shelves, each filled up to the request's maximum. `head="values"` ranks by the value head's
    stream logits instead of the next-item logits."""
    rows = [(k, name) for k, shelves in enumerate(shelf_lists) for name in shelves]
    scores = engine.first_slot_scores([requests[k] for k, _ in rows], [name for _, name in rows], head, batch)
    items, shelf_types = engine.item_ids, engine.shelf_types
    pages: list[list[dict]] = [[] for _ in requests]
    used: list[set] = [set() for _ in requests]
    eligible = [engine.eligible(r.history) for r in requests]
    for (k, name), row_scores in zip(rows, scores):
        request, shelf_row = requests[k], shelf_types.index(name)
        chosen = []
        for j in np.argsort(-row_scores):
            item = items[j]
            if eligible[k][shelf_row, j] and item not in used[k] and item not in request.exclude_items:
                chosen.append(item)
                if len(chosen) == request.max_items_per_shelf:
                    break
        used[k].update(chosen)
        pages[k].append({"shelf": name, "items": chosen})
    return pages


def predicted_streams(engine: PageEngine, requests: list, pages: list[list[dict]]) -> np.ndarray:
    """(R,) the value head's predicted streams of given pages (teacher-forced): the sum over the page's
    items of the predicted stream probability of each item where it stands. An off-policy estimate, as a
    team without a simulator would have it; against the exact value it shows the head's bias. NaN for a page
    with an item the vocabulary lacks (a logged page with items released after training)."""
    return np.array([scored.get("predicted_streams", np.nan) for scored in engine.score(requests, pages)])


NEW_ITEM_COLUMNS = ("new_items_per_page", "new_on_new_releases", "new_release_slots_new", "new_item_streams")


def new_items_placed(pages: list[list[dict]], slot_streams: np.ndarray, known: set[str], num_shelves: int,
                     max_items: int) -> dict[str, float]:
    """Where items unknown at training land, per page: how many are placed, how many on "new_releases",
    the share of "new_releases" slots they fill, and their expected streams (slot probabilities)."""
    placed, on_shelf, shelf_slots, new_slots, streams = [], [], 0, 0, []
    for page, slots in zip(pages, slot_streams):
        count = shelf_count = 0
        total = 0.0
        for s, shelf in enumerate(page[:num_shelves]):
            new = [item not in known for item in shelf["items"][:max_items]]
            count += sum(new)
            total += float(slots[s, :len(new)][np.array(new, bool)].sum()) if new else 0.0
            if shelf["shelf"] == "new_releases":
                shelf_count += sum(new)
                shelf_slots += len(new)
                new_slots += sum(new)
        placed.append(count)
        on_shelf.append(shelf_count)
        streams.append(total)
    return {"new_items_per_page": float(np.mean(placed)), "new_on_new_releases": float(np.mean(on_shelf)),
            "new_release_slots_new": new_slots / shelf_slots if shelf_slots else 0.0,
            "new_item_streams": float(np.mean(streams))}


SHELF_COLUMNS = ("shelf_on_pages", "shelf_streams")


def shelf_use(pages: list[list[dict]], slot_streams: np.ndarray, shelf: str) -> dict[str, float]:
    """The share of pages that show `shelf` and the expected streams of its slots per page."""
    shown = [[k for k, s in enumerate(page[:slot_streams.shape[1]]) if s["shelf"] == shelf] for page in pages]
    streams = [float(slot_streams[row, rows].sum()) if rows else 0.0 for row, rows in enumerate(shown)]
    return {"shelf_on_pages": float(np.mean([bool(rows) for rows in shown])), "shelf_streams": float(np.mean(streams))}


def _log_metrics(page: list[dict], streamed: list[str]) -> tuple[float, float]:
    """Recall and NDCG of the logged streamed items within the page (items ranked in page order)."""
    if not streamed:
        return np.nan, np.nan
    order = [i for shelf in page for i in shelf["items"]]
    position = {item: k for k, item in enumerate(order)}
    hits = [position[i] for i in streamed if i in position]
    ideal = sum(1.0 / np.log2(k + 2) for k in range(len(streamed)))
    return len(hits) / len(streamed), sum(1.0 / np.log2(k + 2) for k in hits) / ideal


def evaluate_pages(checkpoint: str, step: int, meta: dict, workdir: str, num_requests: int,
                   full_shelves: bool = True, beam_size: int = 4, catalog: str | None = None,
                   split: str = "test", watch_shelf: str | None = None, search: dict | None = None) -> dict:
    """The page-quality table on the world's first `num_requests` held-out requests (split "test"; the last
    `num_requests` for split "validation", where settings are chosen). With `full_shelves`
    the requests ask for full rows (min = max items per shelf, as the oracle's pages have); otherwise each
    request keeps its own bounds and homegen decides shelf lengths (the pointwise baseline always fills
    shelves to the maximum). With `catalog`, the catalog's items the checkpoint does not know are added first
    (`PageEngine.refresh_catalog`; an atomic checkpoint cannot add them) and the table reports, per page,
    how many of them each method places, how many on "new_releases", and their expected streams. With
    `watch_shelf` it reports the share of pages that show that shelf type and the expected streams of its
    slots per page (a shelf type added by vocabulary extension, say). `search` overrides the run's `serve`
    settings of beam search (`PageEngine`'s stream_candidates, prior_weight, item_width)."""
    if meta["eligibility"]["kind"] != "world":
        raise ValueError(f"{checkpoint} was trained on page logs; page quality is measured under the synthetic "
                         "world's true response model, so it needs a checkpoint trained on the synthetic world")
    engine = PageEngine(checkpoint, step, **(search or {}))
    known_before = set(engine.item_ids)
    refresh = {}
    if catalog:
        try:
            refresh = engine.refresh_catalog(catalog)
        except ValueError as e:  # an atomic checkpoint: the new items stay unplaceable
            refresh = {"added": 0, "error": str(e)}
        print(f"catalog refresh: {refresh}")
    has_value_head = engine.has_value_head
    world, rules = engine.world, engine.shelf_rules
    validator = engine.validator()
    folder = world_folder(meta, workdir)
    issued = read_split(os.path.join(folder, "requests.jsonl"), num_requests, split)
    requests = issued
    if full_shelves:
        requests = [{**r, "min_items_per_shelf": r.get("max_items_per_shelf", world.config.max_items)} for r in issued]
    logged = read_split(os.path.join(folder, "heldout_pages.jsonl"), num_requests, split)
    cfg = world.config
    parsed = [parse_request(r) for r in requests]
    as_issued = [parse_request(r) for r in issued]
    beam_requests = [parse_request({**r, "beam_size": beam_size}) for r in requests]
    beam = engine.generate(beam_requests)
    sampled = engine.generate([parse_request({**r, "temperature": 1.0, "seed": k}) for k, r in enumerate(requests)])
    beam_shelves = [[s["shelf"] for s in b["page"]] for b in beam]
    # The pointwise baseline ranks every item by its first-slot score: one token per item. With semantic IDs an
    # item's score is a path through the code trie (a forward pass per prefix), so the baseline is left out.
    pointwise = not engine.semantic_ids
    pages = {
        f"homegen beam search ({engine.objective})": [b["page"] for b in beam],
        "homegen sampling": [s["page"] for s in sampled],
        "logging policy": [log["page"] for log in logged],
    }
    # Each beam search is compared with the pointwise baseline filling its own shelves (paired differences).
    partners = {f"homegen beam search ({engine.objective})": "pointwise (same model)"}
    if pointwise:
        pages["pointwise (same model)"] = pointwise_pages(engine, parsed, beam_shelves)
    if has_value_head:  # what the value head adds: likelihood beam search, and its values slotted pointwise
        likelihood = [b["page"] for b in engine.generate(beam_requests, objective="likelihood")]
        pages["homegen beam search (likelihood)"] = likelihood
        if pointwise:
            pages["pointwise (value head)"] = pointwise_pages(engine, parsed, beam_shelves, head="values")
            pages["pointwise (likelihood shelves)"] = pointwise_pages(
                engine, parsed, [[s["shelf"] for s in page] for page in likelihood])
            partners["homegen beam search (likelihood)"] = "pointwise (likelihood shelves)"
    judge = WorldJudge(world, requests, rules)
    slots = {name: judge.slot_probabilities(p) for name, p in pages.items()}
    values = {name: v.sum(axis=(1, 2)) for name, v in slots.items()}
    users, ctx, history, response_model = judge.users, judge.contexts, judge.history, judge.response
    pop_shelves, pop_items = popularity_pages(world, rules, len(requests), cfg.num_shelves, cfg.max_items)
    values["popularity"] = response_model.expected_engagement(judge.batch(pop_shelves, pop_items))
    oracle_shelves, oracle_items = OraclePolicy(response_model).build(users, ctx, history, cfg.num_shelves,
                                                                      cfg.max_items)
    values["oracle"] = response_model.expected_engagement(judge.batch(oracle_shelves, oracle_items))
    # The logging policy asked for the models' page size: every shelf full.
    full_logging = SamplingPolicy(world, rules).build(users, ctx, history, np.random.default_rng(0), cfg.num_shelves,
                                                      cfg.max_items, cfg.max_items)
    values["logging policy (full shelves)"] = response_model.expected_engagement(judge.batch(*full_logging))
    # The floor any model must clear: valid pages of eligible items drawn at random, every shelf full.
    random_pages = random_policy(world, rules).build(users, ctx, history, np.random.default_rng(0), cfg.num_shelves,
                                                     cfg.max_items, cfg.max_items)
    values["random (full shelves)"] = response_model.expected_engagement(judge.batch(*random_pages))

    streamed = [[i for shelf in log["page"] for i, s in zip(shelf["items"], shelf.get("streams") or []) if s > 0]
                for log in logged]
    oracle_mean = float(values["oracle"].mean())
    table = {}
    for name, v in values.items():
        row = {"expected_streams": float(v.mean()), "of_oracle": float(v.mean()) / oracle_mean,
               "per_request": [round(float(x), 5) for x in v]}  # for paired comparisons between checkpoints
        if name in partners and partners[name] in values:  # paired over requests: more than noise?
            gain = v - values[partners[name]]
            row.update(vs_pointwise=float(gain.mean()), vs_pointwise_se=standard_error(gain))
        if name in pages:
            plist = pages[name]
            # Validity against the requests as the world issued them (full shelves are a stricter request).
            valid = [not validator.violations(p, page) for p, page in zip(as_issued, plist)]
            flat = [[i for s in page for i in s["items"]] for page in plist]
            c = world.catalog
            row.update(
                valid_rate=float(np.mean(valid)),
                items_per_page=float(np.mean([len(f) for f in flat])),
                artists_per_page=float(np.mean([len({int(c.artist[world.item_index(i)]) for i in f}) for f in flat])),
                genres_per_page=float(np.mean([len({int(c.genre[world.item_index(i)]) for i in f}) for f in flat])),
                catalog_coverage=len({i for f in flat for i in f}) / c.num_items,
                history_share=float(np.mean([np.mean([i in set(r["history"]) for i in f]) if f else 0
                                             for f, r in zip(flat, requests)])))
            if has_value_head:
                row["predicted_streams"] = float(np.nanmean(predicted_streams(engine, parsed, plist)))
            if catalog:
                row.update(new_items_placed(plist, slots[name], known_before, cfg.num_shelves, cfg.max_items))
            if watch_shelf:
                row.update(shelf_use(plist, slots[name], watch_shelf))
            if name != "logging policy":
                logm = np.array([_log_metrics(page, s) for page, s in zip(plist, streamed)], dtype=float)
                row.update(log_recall=float(np.nanmean(logm[:, 0])), log_ndcg=float(np.nanmean(logm[:, 1])))
        table[name] = row
    print(f"page quality on {len(requests)} held-out {split} requests (exact expected streams under the true model)")
    columns = ["expected_streams", "of_oracle", "predicted_streams", "valid_rate", "items_per_page", "artists_per_page", "genres_per_page",
               "catalog_coverage", "history_share", "log_recall", "log_ndcg"]
    if catalog:
        columns += list(NEW_ITEM_COLUMNS)
    if watch_shelf:
        columns += list(SHELF_COLUMNS)
        print(f"watched shelf type: {watch_shelf}")
    print(f"{'':<36}" + "".join(f"{c[:12]:>13}" for c in columns))
    for name, row in table.items():
        print(f"{name:<36}" + "".join(f"{row[c]:>13.3f}" if c in row else f"{'':>13}" for c in columns))
    for name, row in table.items():
        if "vs_pointwise" in row:
            print(f"{name} - {partners[name]}: {row['vs_pointwise']:+.3f} +- {row['vs_pointwise_se']:.3f} "
                  "expected streams per page (mean paired difference +- its standard error)")
    return {"requests": len(requests), "request_split": split, "full_shelves": full_shelves, "beam_size": beam_size,
            **engine.search_settings, "pages": table,
            **({"catalog_refresh": refresh} if catalog else {})}

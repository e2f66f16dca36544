"""Off-policy evaluation: a page policy's expected streams per page estimated from page logs that carry the
logging policy's propensities (FORMATS.md §3), checked against the synthetic world's exact values.

A page is read as a sequence of decisions, one per item in page order; the first item of a row carries the
row's shelf type with it (its propensity includes the shelf-type draw). For logged page i with decisions
t = 1..T, streams r_t and logging probabilities mu_t (each given everything placed before it), and a target
policy pi with probabilities pi_t of the same decisions given the same prefixes, rho_{1:t} = prod_{k<=t}
pi_k / mu_k. The estimators of pi's expected streams per page (ESTIMATORS):

- direct (DM): a value model's predicted streams of pi's own pages (its teacher-forced stream probability of
  every item where it stands), no logs needed but biased where the model is wrong. The value model is the
  mean of one or more checkpoints' value heads (`ValueModel`);
- direct (isotonic) and direct (logistic): the same, each prediction mapped through a regression of the
  logged streams on the value model's predictions at the logged slots: isotonic (`IsotonicCalibration`, flat
  beyond the logged predictions) or logistic in the prediction's logit (`LogisticCalibration`, Platt scaling,
  which keeps a slope above the logged predictions, where a page optimiser's items sit). Fit the value model
  on the logs themselves: docs/BENCHMARKS.md measured its plain direct estimate as the one within 10% for
  every policy;
- per-decision importance sampling (IPS, the cascade slate estimator): sum_t rho_{1:t} r_t. Unbiased when an
  item's stream depends on what is above it on the page, not below (the cascade assumption; this world's
  shelf coherence bends it a little) and every prefix pi can produce has a positive logging probability.
  A slate's ratio is a product over decisions, so for a deterministic target it is zero from the first
  decision where the log and the target differ;
- doubly robust (DR, plain, isotonic or logistic): DM + sum_t rho_{1:t} (r_t - r_hat_t), with r_hat_t the value
  model's prediction for pi's t-th decision (the mean over pi's pages for a stochastic pi). With these
  baselines the correction has mean zero whatever the value model, so DR is unbiased where IPS is, and
  equals DM where no logged prefix agrees with the target.

The pseudoinverse estimator needs the logging policy's marginal probability of every item at every slot,
which per-decision propensities do not give. docs/BENCHMARKS.md has the measured table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

from homegen.data.formats import DataFormatError, json_lines, parse_page_log

Decision = tuple[int, str, str]  # (row on the page, shelf type, item)


def decisions(page: list[dict]) -> list[Decision]:
    """The decisions of a page ({"shelf", "items"} rows) in page order."""
    return [(row, shelf["shelf"], item) for row, shelf in enumerate(page) for item in shelf["items"]]


@dataclasses.dataclass
class LoggedPages:
    """Page logs as decision arrays, zero-padded to the longest page (T decisions)."""

    records: list[dict]
    rewards: np.ndarray  # (N, T) streams of each decision's item
    log_propensities: np.ndarray  # (N, T) log mu_t
    mask: np.ndarray  # (N, T) real decisions

    @property
    def pages(self) -> list[list[dict]]:
        return [r["page"] for r in self.records]


def read_logged_pages(path: str, limit: int | None = None) -> LoggedPages:
    """The first `limit` page logs of a JSON Lines file; every shelf must carry streams and propensities."""
    records = []
    for number, record in json_lines(path):
        if limit is not None and len(records) == limit:
            break
        log = parse_page_log(record, path, number)
        if any(s.streams is None or s.propensities is None for s in log.page):
            raise DataFormatError(path, number, "off-policy evaluation needs 'streams' and 'propensities' on "
                                  "every shelf (write such logs with scripts/simulate.py --propensities)")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no page logs")
    width = max(len(decisions(r["page"])) for r in records)
    rewards, logp = np.zeros((len(records), width)), np.zeros((len(records), width))
    mask = np.zeros((len(records), width), bool)
    for i, record in enumerate(records):
        streams = [v for s in record["page"] for v in s["streams"]]
        props = [p for s in record["page"] for p in s["propensities"]]
        rewards[i, :len(streams)], logp[i, :len(props)], mask[i, :len(props)] = streams, np.log(props), True
    return LoggedPages(records, rewards, logp, mask)


def matched_log_probs(logged: list[Decision], target: list[Decision], width: int) -> np.ndarray:
    """(width,) log-probabilities of the logged decisions under a deterministic target that produced `target`:
    0 while the log agrees with the target decision by decision, -inf from the first disagreement."""
    out = np.full(width, -np.inf)
    for t, (a, b) in enumerate(zip(logged, target)):
        if a != b:
            break
        out[t] = 0.0
    return out


def cumulative_ratios(target_log_probs: np.ndarray, logged: LoggedPages) -> np.ndarray:
    """(N, T) rho_{1:t}: the product of target / logging probability ratios of the logged decisions up to t."""
    step = np.where(logged.mask, target_log_probs - logged.log_propensities, 0.0)
    with np.errstate(invalid="ignore"):  # -inf - finite stays -inf; the padding is 0
        return np.where(logged.mask, np.exp(np.cumsum(step, axis=1)), 0.0)


def ips(logged: LoggedPages, ratios: np.ndarray) -> np.ndarray:
    """(N,) per-page per-decision importance-sampling estimates sum_t rho_{1:t} r_t."""
    return (ratios * logged.rewards).sum(axis=1)


def doubly_robust(logged: LoggedPages, ratios: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(N,) per-page doubly robust estimates: the direct estimate sum_t r_hat_t plus sum_t rho_{1:t} (r_t - r_hat_t),
    with `predicted` (N, T') the value model's r_hat_t for the target's t-th decision (0 past its page)."""
    width = logged.rewards.shape[1]
    r_hat = np.zeros_like(logged.rewards)
    r_hat[:, :min(width, predicted.shape[1])] = predicted[:, :width]
    return predicted.sum(axis=1) + (ratios * (logged.rewards - r_hat)).sum(axis=1)


class IsotonicCalibration:
    """A non-decreasing map from the value model's predicted stream probability to the stream rate observed
    in the logs at that prediction (pool-adjacent-violators). Beam search picks items because their predicted
    value is high, so its pages collect the items whose value the model overestimates; the logs, whose items
    the logging policy chose without looking at the model's errors, say what a prediction is worth. Beyond the
    logged predictions the map is flat."""

    def __init__(self, predicted: np.ndarray, observed: np.ndarray):
        order = np.argsort(predicted, kind="stable")
        x, y = predicted[order], observed[order].astype(float)
        means, weights, starts, ends = [], [], [], []
        for k in range(len(x)):
            means.append(y[k])
            weights.append(1.0)
            starts.append(x[k])
            ends.append(x[k])
            while len(means) > 1 and means[-2] >= means[-1]:
                w = weights[-2] + weights[-1]
                means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w
                weights[-2], ends[-2] = w, ends[-1]
                del means[-1], weights[-1], starts[-1], ends[-1]
        self.x = np.ravel(np.column_stack([starts, ends]))  # each block's range, its mean on both ends
        self.y = np.repeat(means, 2)

    def __call__(self, predicted: np.ndarray) -> np.ndarray:
        return np.interp(predicted, self.x, self.y)


class LogisticCalibration:
    """Platt scaling: the logged stream rate as sigmoid(a logit(p) + b) of the value model's prediction p, with
    a and b fit by Newton's method on the logged slots' cross-entropy. Two parameters instead of isotonic
    regression's many blocks; it keeps a slope beyond the logged predictions, where isotonic regression is flat
    at the mean of its top block."""

    def __init__(self, predicted: np.ndarray, observed: np.ndarray, iterations: int = 50):
        x = _logit(predicted)
        y = np.asarray(observed, float)
        features = np.column_stack([x, np.ones_like(x)])
        self.weights = np.array([1.0, 0.0])  # the identity map
        for _ in range(iterations):
            p = _sigmoid(features @ self.weights)
            gradient = features.T @ (p - y)
            hessian = features.T @ (features * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            self.weights -= step
            if np.abs(step).max() < 1e-10:
                break

    def __call__(self, predicted: np.ndarray) -> np.ndarray:
        return _sigmoid(self.weights[0] * _logit(predicted) + self.weights[1])


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def bootstrap_spread(per_page: np.ndarray, rounds: int = 1000, seed: int = 0) -> float:
    """The standard deviation of the mean of per-page estimates over bootstrap resamples of the pages."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_page), size=(rounds, len(per_page)))
    return float(per_page[draws].mean(axis=1).std(ddof=1))


def stream_predictions(scored: list[dict], width: int) -> np.ndarray:
    """(N, width) the value model's per-decision stream probabilities from `PageEngine.score` results."""
    out = np.zeros((len(scored), width))
    for i, result in enumerate(scored):
        if "error" in result:
            raise ValueError(f"the value model cannot score page {i}: {result['error']}")
        probs = [p for s in result["page"] for p in s["stream_probs"]][:width]
        out[i, :len(probs)] = probs
    return out


def sampling_log_probs(engine, requests: list, logged: LoggedPages) -> np.ndarray:
    """(N, T) log-probabilities of the logged decisions under the model's own next-token distribution (the
    shelf token's and the item's for a row's first item), teacher-forced on the logged pages. A decision
    with a shelf or item the model's vocabulary lacks has probability 0, as has everything after it."""
    width = logged.rewards.shape[1]
    truncated = []
    for page in logged.pages:
        keep = []
        for shelf in page:
            if not engine.knows_shelf(shelf["shelf"]):
                break
            known = []
            for item in shelf["items"]:
                if not engine.knows_item(item):
                    break
                known.append(item)
            if known:
                keep.append({"shelf": shelf["shelf"], "items": known})
            if len(known) < len(shelf["items"]):
                break
        truncated.append(keep)
    scored = engine.score(requests, truncated)
    out = np.full((len(truncated), width), -np.inf)
    for i, result in enumerate(scored):
        if "error" in result:  # an empty page: the log's first decision is already impossible
            continue
        values = [s["shelf_score"] * (k == 0) + score for s in result["page"] for k, score in enumerate(s["item_scores"])]
        out[i, :len(values)] = values
    return out


@dataclasses.dataclass
class Target:
    """A policy to evaluate on the logged requests: its pages (several per request for a stochastic policy),
    and the log-probabilities it gives the logged decisions."""

    pages: list[list[list[dict]]]  # per request, one or more pages
    log_probs: np.ndarray  # (N, T)


CALIBRATIONS = {"isotonic": IsotonicCalibration, "logistic": LogisticCalibration}
ESTIMATORS = ("direct", *(f"direct ({c})" for c in CALIBRATIONS), "ips", "doubly robust",
              *(f"doubly robust ({c})" for c in CALIBRATIONS))


class ValueModel:
    """Per-decision stream predictions of pages: the mean over one or more checkpoints' value heads (an
    ensemble of models trained apart is less fooled by the errors a policy's own value head steered it to)."""

    def __init__(self, engines: list):
        self.engines = engines

    def predict(self, requests: list, pages: list[list[dict]], width: int) -> np.ndarray:
        """(N, width) the mean predicted stream probability of each page's decisions."""
        return np.mean([stream_predictions(e.score(requests, pages), width) for e in self.engines], axis=0)


def estimate(target: Target, logged: LoggedPages, judge, value_model: ValueModel, requests: list,
             calibrations: dict[str, Callable[[np.ndarray], np.ndarray]],
             rounds: int = 1000) -> dict[str, dict[str, float]]:
    """The estimates (ESTIMATORS) of a target's expected streams per page, with its exact value (the judge's
    mean over its pages), each estimate's bias and bootstrap spread over the logged pages. "direct (NAME)"
    and "doubly robust (NAME)" pass the value model's predictions through `calibrations[NAME]` first."""
    copies = len(target.pages[0])
    exact = np.mean([judge.slot_probabilities([p[k] for p in target.pages]).sum(axis=(1, 2))
                     for k in range(copies)], axis=0)
    lengths = np.array([[len(decisions(page)) for page in pages] for pages in target.pages])  # (N, copies)
    width = int(lengths.max())
    scored = [value_model.predict(requests, [p[k] for p in target.pages], width) for k in range(copies)]
    mask = [np.arange(width) < lengths[:, k, None] for k in range(copies)]
    predicted = np.mean(scored, axis=0)
    ratios = cumulative_ratios(target.log_probs, logged)
    per_page = {"direct": predicted.sum(axis=1), "ips": ips(logged, ratios),
                "doubly robust": doubly_robust(logged, ratios, predicted)}
    for name, calibration in calibrations.items():
        calibrated = np.mean([np.where(m, calibration(x), 0.0) for x, m in zip(scored, mask)], axis=0)
        per_page[f"direct ({name})"] = calibrated.sum(axis=1)
        per_page[f"doubly robust ({name})"] = doubly_robust(logged, ratios, calibrated)
    truth = float(exact.mean())
    out = {"exact": {"value": truth, "spread": bootstrap_spread(exact, rounds)}}
    for name in ESTIMATORS:
        value = float(per_page[name].mean())
        out[name] = {"value": value, "bias": value - truth, "relative_bias": (value - truth) / truth,
                     "spread": bootstrap_spread(per_page[name], rounds)}
    out["matched_first_decision"] = {"value": float((ratios[:, 0] > 0).mean())}
    return out


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per policy and estimator."""
    lines = ["| policy | estimator | estimate | exact | bias | relative bias | spread (bootstrap sd) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for policy, row in results.items():
        truth = row["exact"]["value"]
        for name in ESTIMATORS:
            e = row[name]
            lines.append(f"| {policy} | {name} | {e['value']:.3f} | {truth:.3f} | {e['bias']:+.3f} | "
                         f"{e['relative_bias']:+.1%} | {e['spread']:.3f} |")
    return "\n".join(lines)


def world_requests(logged: LoggedPages, num_shelves: int, max_items: int) -> list[dict]:
    """FORMATS.md §4 requests for the logged pages' users and contexts, asking for full shelves."""
    return [{"user_id": r["user_id"], "history": r.get("history", []), "context": r.get("context", {}),
             "num_shelves": num_shelves, "min_items_per_shelf": max_items, "max_items_per_shelf": max_items}
            for r in logged.records]


def world_config_of(folder: str):
    """The config of the synthetic world a simulate.py folder was written from (its world.json)."""
    from homegen.data.simulator.world import WorldConfig

    path = os.path.join(folder, "world.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: --logs must be a folder written by scripts/simulate.py")
    with open(path) as f:
        return WorldConfig(**json.load(f))


def off_policy_evaluation(checkpoint: str, logs: str, num_pages: int, step: int | None = None,
                          value_models: list[str] | None = None, samples: int = 4, beam_size: int = 4,
                          rounds: int = 1000) -> dict[str, dict]:
    """The off-policy table for a synthetic-world checkpoint: its beam search, sampling (temperature 1,
    `samples` pages per request) and pointwise pages, and the logging policy itself, on the first `num_pages`
    held-out page logs of `logs` (a `scripts/simulate.py --propensities` folder of the checkpoint's world, or
    a page-log file of that world's users, e.g. `homegen join` of pages a server sampled for them).
    DM and DR use the mean of the value heads of `value_models` (default: the checkpoint's own)."""
    from homegen.evaluation.pages import WorldJudge, pointwise_pages
    from homegen.serving.engine import PageEngine
    from homegen.serving.requests import parse_request

    engine = PageEngine(checkpoint, step)
    world = engine.world
    if world is None:
        raise ValueError(f"{checkpoint} was not trained on the synthetic world: exact values need its world")
    if os.path.isdir(logs):
        logs_config = world_config_of(logs)
        if logs_config != world.config:  # the same config builds the same world: the checkpoint's is used
            raise ValueError(f"{logs} was written from another world ({dataclasses.asdict(logs_config)}) than "
                             f"{checkpoint} was trained on ({dataclasses.asdict(world.config)})")
    value_engines = [PageEngine(path) for path in value_models] if value_models else [engine]
    for path, value_engine in zip(value_models or [checkpoint], value_engines):
        if not value_engine.has_value_head:
            raise ValueError(f"{path} has no value head: DM and DR need one")
    value_model = ValueModel(value_engines)
    logged = read_logged_pages(os.path.join(logs, "heldout_pages.jsonl") if os.path.isdir(logs) else logs, num_pages)
    requests = world_requests(logged, world.config.num_shelves, world.config.max_items)
    parsed = [parse_request(r) for r in requests]
    judge = WorldJudge(world, requests)
    width = logged.rewards.shape[1]

    def deterministic(pages: list[list[dict]]) -> Target:
        log_probs = np.stack([matched_log_probs(decisions(log), decisions(page), width)
                              for log, page in zip(logged.pages, pages)])
        return Target([[p] for p in pages], log_probs)

    beam = engine.generate([parse_request({**r, "beam_size": beam_size}) for r in requests])
    beam_pages = [b["page"] for b in beam]
    sampled = [engine.generate([parse_request({**r, "temperature": 1.0, "seed": k * samples + j})
                                for k, r in enumerate(requests)]) for j in range(samples)]
    logged_predictions = value_model.predict(parsed, logged.pages, width)
    calibrations = {name: fit(logged_predictions[logged.mask], logged.rewards[logged.mask])
                    for name, fit in CALIBRATIONS.items()}
    targets = {
        "logging policy": Target([[p] for p in logged.pages], np.where(logged.mask, logged.log_propensities, 0.0)),
        f"homegen beam search ({engine.objective})": deterministic(beam_pages),
        "homegen sampling": Target([[s[k]["page"] for s in sampled] for k in range(len(requests))],
                                   sampling_log_probs(engine, parsed, logged)),
    }
    if not engine.semantic_ids:
        shelves = [[s["shelf"] for s in page] for page in beam_pages]
        targets["pointwise (same model)"] = deterministic(pointwise_pages(engine, parsed, shelves))
    return {name: estimate(target, logged, judge, value_model, parsed, calibrations, rounds)
            for name, target in targets.items()}

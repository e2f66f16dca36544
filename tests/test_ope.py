"""Off-policy evaluation: the simulator's propensities are the logging policy's true probabilities, the
estimators are unbiased where the theory says (checked exactly, by enumerating every logged page of a small
slate problem), and scripts/ope.py gives the table end to end with exact values from the world."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import train_tiny_run

from homegen.evaluation.ope import LoggedPages, cumulative_ratios, doubly_robust, ips, matched_log_probs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ope(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/ope.py", *args], cwd=ROOT, capture_output=True, text=True)


def _enumerated_problem():
    """Two decisions over four items without repetition; logging probabilities mu(a1), mu(a2 | a1); a cascade
    reward: each decision's expected stream depends on its item and the item above it."""
    rng = np.random.default_rng(0)
    items = range(4)
    mu1 = rng.dirichlet(np.ones(4))
    mu2 = {a: _renormalised(rng.dirichlet(np.ones(4)), a) for a in items}
    base = rng.random(4)
    reward = {(a,): base[a] for a in items} | {(a, b): base[b] * (0.5 if abs(a - b) == 1 else 1.0)
                                               for a in items for b in items if a != b}
    pages = [(a, b) for a, b in itertools.permutations(items, 2)]
    probs = np.array([mu1[a] * mu2[a][b] for a, b in pages])
    records = [{"page": [{"shelf": "s", "items": [str(a), str(b)]}]} for a, b in pages]
    logged = LoggedPages(records, np.array([[reward[(a,)], reward[(a, b)]] for a, b in pages]),
                         np.log([[mu1[a], mu2[a][b]] for a, b in pages]), np.ones((len(pages), 2), bool))
    return pages, probs, reward, logged


def _renormalised(p, removed):
    p = p.copy()
    p[removed] = 0
    return p / p.sum()


def test_estimators_are_unbiased_by_enumeration():
    """E_mu[IPS] and E_mu[DR] (weighted by each logged page's probability) equal the target's true value, for a
    deterministic and a stochastic target, whatever the value model predicts; DM is the prediction."""
    pages, probs, reward, logged = _enumerated_problem()
    assert probs.sum() == pytest.approx(1.0)
    wrong_model = np.array([[0.9, 0.05]])  # the value model's predictions of the target's two decisions

    target = (2, 1)  # deterministic
    truth = reward[target[:1]] + reward[target]
    log_probs = np.stack([matched_log_probs([(0, "s", str(a)), (0, "s", str(b))], [(0, "s", "2"), (0, "s", "1")], 2)
                          for a, b in pages])
    ratios = cumulative_ratios(log_probs, logged)
    assert np.average(ips(logged, ratios), weights=probs) == pytest.approx(truth)
    dr = doubly_robust(logged, ratios, np.repeat(wrong_model, len(pages), axis=0))
    assert np.average(dr, weights=probs) == pytest.approx(truth)
    # Where the log disagrees with the target from the first decision, DR is the direct estimate.
    disagree = [k for k, (a, _) in enumerate(pages) if a != 2]
    np.testing.assert_allclose(dr[disagree], wrong_model.sum())

    pi1 = np.array([0.1, 0.2, 0.3, 0.4])  # stochastic, with its own second-decision distribution
    pi2 = {a: _renormalised(np.array([0.25, 0.25, 0.25, 0.25]) + 0.1 * np.arange(4), a) for a in range(4)}
    truth = sum(pi1[a] * pi2[a][b] * (reward[(a,)] + reward[(a, b)]) for a, b in pages)
    ratios = cumulative_ratios(np.log([[pi1[a], pi2[a][b]] for a, b in pages]), logged)
    assert np.average(ips(logged, ratios), weights=probs) == pytest.approx(truth)
    dr = doubly_robust(logged, ratios, np.repeat(wrong_model, len(pages), axis=0))
    assert np.average(dr, weights=probs) == pytest.approx(truth)
    # On-policy (the target is the logging policy) the ratios are 1 and IPS is the logged streams.
    ratios = cumulative_ratios(logged.log_propensities, logged)
    np.testing.assert_allclose(ratios, 1.0)
    np.testing.assert_allclose(ips(logged, ratios), logged.rewards.sum(axis=1))


def test_isotonic_calibration():
    """Pool-adjacent-violators: a non-decreasing map through the block means, flat beyond the data, whose
    fitted values keep the observed mean."""
    from homegen.evaluation.ope import IsotonicCalibration

    calibration = IsotonicCalibration(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 0.0, 0.0, 1.0]))
    np.testing.assert_allclose(calibration(np.array([0.0, 0.1, 0.3, 0.4, 0.9])), [1 / 3, 1 / 3, 1 / 3, 1.0, 1.0])
    rng = np.random.default_rng(0)
    x = rng.random(3000)
    y = (rng.random(3000) < 0.5 * x).astype(float)  # the true rate is half the prediction
    calibration = IsotonicCalibration(x, y)
    fitted = calibration(np.sort(x))
    assert (np.diff(fitted) >= 0).all()
    assert fitted.mean() == pytest.approx(y.mean(), abs=2e-3)
    assert calibration(np.array([0.8]))[0] == pytest.approx(0.4, abs=0.08)


def test_logistic_calibration():
    """Platt scaling recovers the logit-linear map that generated the streams, keeps a slope beyond the data
    (where isotonic regression is flat), and leaves calibrated predictions as they are."""
    from homegen.evaluation.ope import IsotonicCalibration, LogisticCalibration

    rng = np.random.default_rng(0)
    x = rng.uniform(0.02, 0.5, 20000)
    logit = np.log(x) - np.log1p(-x)
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-(0.7 * logit - 0.4)))).astype(float)
    calibration = LogisticCalibration(x, y)
    np.testing.assert_allclose(calibration.weights, [0.7, -0.4], atol=0.06)
    beyond = np.array([0.6, 0.8, 0.95])
    assert (np.diff(calibration(beyond)) > 0).all()
    assert np.ptp(IsotonicCalibration(x, y)(beyond)) == 0.0
    honest = (rng.random(len(x)) < x).astype(float)
    np.testing.assert_allclose(LogisticCalibration(x, honest)(beyond), beyond, atol=0.03)


def test_plackett_luce_logging_probabilities_match_frequencies():
    """The logged propensity of the first decision (shelf type and item) and of the second item given the
    first are the frequencies with which the policy makes them; pages are full, valid and without repeats."""
    from homegen.data.simulator.policies import PlackettLucePolicy
    from homegen.data.simulator.shelves import ShelfRules
    from homegen.data.simulator.simulate import Simulator
    from homegen.data.simulator.world import World, WorldConfig

    world = World(WorldConfig(num_items=400, num_users=30, seed=5))
    rules = ShelfRules(world)
    users, ctx, history = Simulator(world).requests(1, np.full(1, world.config.now_day))
    n = 4000
    rows = np.zeros(n, np.int64)
    shelves, items, props = PlackettLucePolicy(world, rules).build_with_propensities(
        users[rows], ctx.take(rows), history[rows], np.random.default_rng(1), 6, 10)
    assert (shelves >= 0).all() and (items >= 0).all() and ((props > 0) & (props <= 1)).all()
    for k in range(20):
        flat = items[k].ravel()
        assert len(set(flat.tolist())) == flat.size
        for s in range(6):
            assert np.isin(items[k, s], rules.pool(int(shelves[k, s]), history[0])).all()
    first = shelves[:, 0] * world.catalog.num_items + items[:, 0, 0]
    values, counts = np.unique(first, return_counts=True)
    for value in values[np.argsort(-counts)[:3]]:
        chosen = first == value
        p = props[chosen, 0, 0]
        np.testing.assert_allclose(p, p[0], rtol=1e-9)  # the same decision, the same propensity
        assert abs(chosen.mean() - p[0]) < 4 * np.sqrt(p[0] * (1 - p[0]) / n) + 1e-3
    modal = first == values[np.argmax(counts)]
    second = items[modal, 0, 1]
    top = np.bincount(second).argmax()
    p = props[modal, 0, 1][second == top][0]
    assert abs((second == top).mean() - p) < 4 * np.sqrt(p * (1 - p) / modal.sum()) + 1e-3


def test_simulated_logs_carry_consistent_propensities(tmp_path):
    from homegen.data.formats import iter_page_logs
    from homegen.data.simulator.simulate import write_world
    from homegen.data.simulator.world import WorldConfig

    write_world(WorldConfig(num_items=300, num_users=40, seed=2), str(tmp_path), 50, 10, propensities=True)
    for name in ("pages.jsonl", "heldout_pages.jsonl"):
        logs = list(iter_page_logs(str(tmp_path / name)))
        for log in logs:
            assert all(len(s.items) == 10 and len(s.propensities) == 10 for s in log.page)
            total = sum(np.log(p) for s in log.page for p in s.propensities)
            assert log.log_propensity == pytest.approx(total, abs=1e-4)


def test_ips_is_within_its_error_of_the_exact_value_on_a_seeded_world(tmp_path):
    """On a seeded world, the logging policy's value estimated by per-decision IPS from its own Plackett-Luce
    logs (ratios 1: the logged streams) lands within three standard errors, and within 10%, of the world's
    exact expected streams of the same 600 pages: the sampled streams and the estimator agree with the
    response model the exact values come from. (Another target: the next test; the checkpoints' errors at the
    table's sizes are measured in docs/BENCHMARKS.md, Off-policy evaluation.)"""
    from homegen.data.simulator.simulate import write_world
    from homegen.data.simulator.world import World, WorldConfig
    from homegen.evaluation.ope import read_logged_pages, world_requests
    from homegen.evaluation.pages import WorldJudge

    config = WorldConfig(num_items=300, num_users=60, seed=4)
    write_world(config, str(tmp_path), 10, 600, propensities=True)
    logged = read_logged_pages(str(tmp_path / "heldout_pages.jsonl"))
    world = World(config)
    judge = WorldJudge(world, world_requests(logged, config.num_shelves, config.max_items))
    exact = judge.slot_probabilities(logged.pages).sum(axis=(1, 2))  # each logged page's expected streams
    estimate = ips(logged, cumulative_ratios(logged.log_propensities, logged))
    error = estimate.mean() - exact.mean()
    se = estimate.std(ddof=1) / np.sqrt(len(estimate))
    assert abs(error) < 3 * se, (error, se)
    assert abs(error) / exact.mean() < 0.1  # 600 pages: within 10% of the exact value


def test_ips_of_another_policy_is_within_its_error_of_that_policys_value(tmp_path):
    """Logs of the Plackett-Luce logging policy (noise 0.7) evaluate a different target, the same policy at
    noise 0.8: its probabilities of the logged decisions (`propensities_of`, which replays the logging
    policy's own pages to their logged propensities) give per-decision IPS within three standard errors, and
    within 10%, of the target's value measured by drawing its own pages (8 per request, exact expected
    streams of each)."""
    from homegen.data.simulator.policies import PlackettLucePolicy
    from homegen.data.simulator.simulate import write_world
    from homegen.data.simulator.world import World, WorldConfig
    from homegen.evaluation.ope import read_logged_pages, world_requests
    from homegen.evaluation.pages import WorldJudge

    config = WorldConfig(num_items=300, num_users=60, seed=4)
    write_world(config, str(tmp_path), 10, 600, propensities=True)
    logged = read_logged_pages(str(tmp_path / "heldout_pages.jsonl"))
    world = World(config)
    judge = WorldJudge(world, world_requests(logged, config.num_shelves, config.max_items))
    shelves, items = map(np.stack, zip(*[judge.convert(p) for p in logged.pages]))
    state = (judge.users, judge.contexts, judge.history)

    def decision_log_probs(policy) -> np.ndarray:  # (N, T) in the logs' decision order
        probs = policy.propensities_of(*state, shelves, items)
        with np.errstate(divide="ignore"):
            return np.stack([np.log(row[page >= 0]) for row, page in zip(probs, items)])

    np.testing.assert_allclose(decision_log_probs(PlackettLucePolicy(world, judge.rules)), logged.log_propensities,
                               atol=1e-4)
    target = PlackettLucePolicy(world, judge.rules, noise=0.8)
    estimate = ips(logged, cumulative_ratios(decision_log_probs(target), logged))
    rng = np.random.default_rng(0)
    drawn = np.mean([judge.response.expected_engagement(judge.batch(*target.build_with_propensities(
        *state, rng, config.num_shelves, config.max_items)[:2])) for _ in range(8)], axis=0)
    error = estimate.mean() - drawn.mean()
    se = np.hypot(estimate.std(ddof=1), drawn.std(ddof=1)) / np.sqrt(len(estimate))
    assert abs(error) < 3 * se, (error, se)
    assert abs(error) / drawn.mean() < 0.1


@pytest.fixture(scope="module")
def propensity_logs(tmp_path_factory):
    """Page logs with propensities from the tiny preset's world (the one `tiny_checkpoint` was trained on)."""
    from homegen.data.builders import WORLD_PRESETS
    from homegen.data.simulator.simulate import write_world
    from homegen.data.simulator.world import WorldConfig

    tiny = WORLD_PRESETS["tiny"]
    out = str(tmp_path_factory.mktemp("ope_logs"))
    write_world(WorldConfig(num_items=tiny["items"], num_users=tiny["users"], seed=0), out, 100, 12,
                propensities=True)
    return out


def test_ope_script_end_to_end(tiny_checkpoint, propensity_logs, tmp_path):
    """The table's exact values are the world's, the logging policy's IPS and DR are its logged streams,
    and DR differs from DM only through logged prefixes that agree with the target."""
    from homegen.data.simulator.world import World
    from homegen.evaluation.ope import read_logged_pages, world_config_of, world_requests
    from homegen.evaluation.pages import WorldJudge

    result = ope("--checkpoint", tiny_checkpoint, "--logs", propensity_logs, "--pages", "12", "--samples", "2",
                 "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    results = json.load(open(tmp_path / "ope.json"))
    assert set(results) == {"logging policy", "homegen beam search (streams)", "homegen sampling",
                            "pointwise (same model)"}
    logged = read_logged_pages(os.path.join(propensity_logs, "heldout_pages.jsonl"), 12)
    world = World(world_config_of(propensity_logs))
    judge = WorldJudge(world, world_requests(logged, world.config.num_shelves, world.config.max_items))
    exact = judge.slot_probabilities(logged.pages).sum(axis=(1, 2)).mean()
    row = results["logging policy"]
    assert row["exact"]["value"] == pytest.approx(exact)
    assert row["ips"]["value"] == pytest.approx(logged.rewards.sum(axis=1).mean())
    for name in ("doubly robust", "doubly robust (isotonic)", "doubly robust (logistic)"):  # ratios of 1: DR is the logged streams
        assert row[name]["value"] == pytest.approx(row["ips"]["value"])
    for name, row in results.items():
        assert row["direct"]["value"] > 0 and row["exact"]["value"] > 0
        assert row["ips"]["bias"] == pytest.approx(row["ips"]["value"] - row["exact"]["value"])
        if name != "logging policy" and row["matched_first_decision"]["value"] == 0:
            assert row["doubly robust"]["value"] == pytest.approx(row["direct"]["value"])
            for calibration in ("isotonic", "logistic"):
                assert row[f"doubly robust ({calibration})"]["value"] == pytest.approx(
                    row[f"direct ({calibration})"]["value"])
    assert "| homegen sampling | doubly robust |" in open(tmp_path / "ope.md").read()


def test_logs_it_cannot_use_are_refused(tiny_checkpoint, propensity_logs, tmp_path):
    from homegen.data.formats import DataFormatError
    from homegen.data.simulator.simulate import write_world
    from homegen.data.simulator.world import WorldConfig
    from homegen.evaluation.ope import off_policy_evaluation

    other = tmp_path / "other"
    write_world(WorldConfig(num_items=300, num_users=40, seed=2), str(other), 10, 3, propensities=True)
    with pytest.raises(ValueError, match="another world"):
        off_policy_evaluation(tiny_checkpoint, str(other), 3)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "world.json").write_text(open(os.path.join(propensity_logs, "world.json")).read())
    records = [json.loads(line) for line in open(os.path.join(propensity_logs, "heldout_pages.jsonl"))]
    for shelf in records[1]["page"]:  # the second log without its propensities
        del shelf["propensities"]
    (plain / "heldout_pages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataFormatError, match="propensities") as err:
        off_policy_evaluation(tiny_checkpoint, str(plain), 3)
    assert err.value.line == 2 and err.value.path.endswith("heldout_pages.jsonl")
    with pytest.raises(FileNotFoundError, match="world.json"):
        off_policy_evaluation(tiny_checkpoint, str(tmp_path), 3)


def test_a_value_model_trained_on_the_logs_scores_the_checkpoints_pages(tiny_checkpoint, propensity_logs, tmp_path,
                                                                       tmp_path_factory):
    """README's recipe: a run trained on the propensity logs' own pages (its vocabulary from LOGS/catalog.jsonl)
    is the value model of another checkpoint's table: it scores every decision of the world's pages."""
    from homegen.evaluation.ope import off_policy_evaluation

    logs_value = train_tiny_run(str(tmp_path / "tfds"), tmp_path_factory, "logs_value",
                                page_logs=os.path.join(propensity_logs, "pages.jsonl"),
                                catalog=os.path.join(propensity_logs, "catalog.jsonl"))
    own = off_policy_evaluation(tiny_checkpoint, propensity_logs, 6, samples=1)
    fit = off_policy_evaluation(tiny_checkpoint, propensity_logs, 6, samples=1, value_models=[logs_value])
    for policy, row in fit.items():
        assert row["exact"]["value"] == pytest.approx(own[policy]["exact"]["value"])  # same pages, same world
        assert row["ips"]["value"] == pytest.approx(own[policy]["ips"]["value"])  # IPS needs no value model
        assert row["direct"]["value"] > 0 and row["direct"]["value"] != pytest.approx(own[policy]["direct"]["value"])

import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from homegen.data.formats import iter_page_logs
from homegen.data.simulator.policies import OraclePolicy, policy_engagement
from homegen.data.simulator.response import PageBatch
from homegen.data.simulator.shelves import SHELF_NAMES, ShelfRules
from homegen.data.simulator.simulate import Simulator, write_world
from homegen.data.simulator.world import World, WorldConfig

CONFIG = WorldConfig(num_items=800, num_users=150, seed=11)


@pytest.fixture(scope="module")
def sim():
    return Simulator(World(CONFIG))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_world(WorldConfig(num_items=300, num_users=50, seed=seed), str(tmp_path / name), 400, 20)
    files = ["world.json", "catalog.jsonl", "pages.jsonl", "requests.jsonl", "heldout_pages.jsonl"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert match == files and not mismatch and not errors
    assert not filecmp.cmp(tmp_path / "a" / "pages.jsonl", tmp_path / "c" / "pages.jsonl", shallow=False)


def test_expected_engagement_matches_monte_carlo(sim):
    users, ctx, history = sim.requests(40, np.full(40, CONFIG.now_day))
    batch, _, _ = sim.logged_pages(users, ctx, history)
    exact = sim.response.expected_engagement(batch)
    rng = np.random.default_rng(0)
    draws = np.stack([sim.response.sample_streams(batch, rng).sum(axis=(1, 2)) for _ in range(3000)])
    mean, se = draws.mean(axis=0), draws.std(axis=0) / np.sqrt(len(draws)) + 1e-9
    assert np.all(np.abs(mean - exact) < 5 * se + 1e-3), np.max(np.abs(mean - exact) / se)
    assert abs(mean.mean() - exact.mean()) < 0.02 * exact.mean()


def test_repetition_and_examination_lower_engagement(sim):
    users, ctx, history = sim.requests(1, np.full(1, CONFIG.now_day))
    c = sim.world.catalog
    same_artist = np.flatnonzero(c.artist == np.bincount(c.artist).argmax())[:8]
    other = np.array([np.flatnonzero(c.artist == a)[0] for a in np.unique(c.artist)[:8]])
    shelf = np.array([[0]])

    def value(items):
        return sim.response.expected_engagement(PageBatch(users, ctx, history, shelf, items[None, None, :]))[0]

    # The same items twice count once; a longer shelf never lowers engagement.
    assert value(np.concatenate([other[:4], other[:4]])) < value(other)
    assert value(other[:4]) < value(other)
    probs = sim.response.slot_probabilities(PageBatch(users, ctx, history, shelf, same_artist[None, None, :]))
    single = sim.response.slot_probabilities(PageBatch(users, ctx, history, shelf, same_artist[None, None, 7:8]))
    assert probs[0, 0, 7] < single[0, 0, 0]  # artist repetition and position both lower the last slot


def test_oracle_beats_logging_beats_random(sim):
    n = 40
    users, ctx, history = sim.requests(n, np.full(n, CONFIG.now_day))
    batch, _, _ = sim.logged_pages(users, ctx, history)
    values = policy_engagement(sim.response, users, ctx, history, (batch.shelves, batch.items),
                               np.random.default_rng(1), CONFIG.num_shelves, CONFIG.min_items, CONFIG.max_items)
    means = {k: v.mean() for k, v in values.items()}
    assert means["oracle"] > means["logging policy"] > means["random"], means
    assert np.mean(values["oracle"] >= values["logging policy"]) > 0.95


def test_logged_pages_obey_shelf_rules_and_shape(sim):
    users, ctx, history = sim.requests(200, np.full(200, CONFIG.now_day))
    batch, streams, _ = sim.logged_pages(users, ctx, history)
    rules = sim.rules
    for row in range(200):
        seen = set()
        shelves = batch.shelves[row]
        assert (shelves >= 0).sum() >= 1 and np.all(shelves[(shelves >= 0).sum():] < 0)
        for s, shelf in enumerate(shelves[shelves >= 0]):
            items = batch.items[row, s][batch.items[row, s] >= 0]
            assert CONFIG.min_items <= len(items) <= CONFIG.max_items
            assert set(items.tolist()) <= set(rules.pool(int(shelf), history[row]).tolist()), SHELF_NAMES[shelf]
            assert not seen & set(items.tolist())
            seen |= set(items.tolist())
    assert streams[batch.items < 0].sum() == 0 and streams.sum() > 0


def test_oracle_respects_rules(sim):
    users, ctx, history = sim.requests(3, np.full(3, CONFIG.now_day))
    for k in range(3):
        shelves, items = OraclePolicy(sim.response).build_one(int(users[k]), ctx.take(np.array([k])), history[k],
                                                             6, 10)
        flat = items[items >= 0]
        assert len(flat) == len(set(flat.tolist()))
        for s, shelf in enumerate(shelves[shelves >= 0]):
            assert set(items[s][items[s] >= 0].tolist()) <= set(sim.rules.pool(int(shelf), history[k]).tolist())


def test_world_files_follow_formats(tiny_world_dir):
    logs = list(iter_page_logs(os.path.join(tiny_world_dir, "pages.jsonl")))
    assert len(logs) == 3000 and all(log.page for log in logs)
    days = np.array([log.timestamp for log in logs]) // 86_400
    assert np.all(np.diff(days) >= 0) and days[-1] > days[0]  # pages are logged day by day
    # Histories grow with what users streamed.
    assert any(len(log.history) > 10 for log in logs[-500:])


def test_shelf_rules_cover_required_types():
    rules = ShelfRules(World(CONFIG))
    assert len(rules.names) >= 10
    c = rules.world.catalog
    fresh = rules.static_pool(rules.index["new_releases"])
    assert np.all(c.release_day[fresh] >= CONFIG.now_day - CONFIG.new_release_days)
    history = np.array([-1, -1, 5, 9])
    assert set(rules.pool(rules.index["recently_played"], history).tolist()) == {5, 9}
    byl = rules.pool(rules.index["because_you_listened"], history)
    assert set(c.style_key[byl].tolist()) == set(c.style_key[[5, 9]].tolist())


def test_simulate_cli_reports_bad_arguments(tmp_path):
    result = subprocess.run([sys.executable, "scripts/simulate.py", "--out", str(tmp_path), "--items", "5"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "num_items=5 is too small" in result.stderr


def test_simulate_cli_prints_table(tmp_path):
    result = subprocess.run([sys.executable, "scripts/simulate.py", "--out", str(tmp_path), "--items", "500",
                             "--pages", "300", "--requests", "20", "--eval-requests", "10"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("policy"))) + 1:]
    rows = {line[:16].strip(): [float(x) for x in line[16:].split()] for line in table}
    assert set(rows) == {"logging policy", "popularity", "random", "oracle"}
    oracle = rows["oracle"][0]
    # The oracle's pages are worth more than every policy's, random pages the least; fractions are of it.
    assert oracle > rows["logging policy"][0] > rows["random"][0] and oracle > rows["popularity"][0]
    for streams, fraction in rows.values():
        assert fraction == pytest.approx(streams / oracle, abs=1e-3)
    for name in ("catalog.jsonl", "pages.jsonl", "requests.jsonl"):
        assert (tmp_path / name).stat().st_size > 0


def test_catalog_only_writes_the_same_catalog_as_the_world(tiny_world_dir, tmp_path):
    result = subprocess.run([sys.executable, "scripts/simulate.py", "--out", str(tmp_path), "--items", "600",
                             "--seed", "3", "--catalog_only"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["catalog.jsonl"]
    assert filecmp.cmp(tmp_path / "catalog.jsonl", os.path.join(tiny_world_dir, "catalog.jsonl"), shallow=False)

"""The history-informed oracle (evaluation/ceiling.py) and its script."""

import json
import os

import numpy as np

from homegen.data.simulator.policies import OraclePolicy
from homegen.data.simulator.response import PageBatch, ResponseModel
from homegen.data.simulator.world import GENRES, World, WorldConfig
from homegen.evaluation.ceiling import FACTORS, estimate_users, informed_oracle_values


def _requests(world, count=12):
    from homegen.data.simulator.simulate import Simulator

    sim = Simulator(world)
    for _ in range(3):  # a few rounds of logged pages so that histories hold streamed items
        users, ctx, history = sim.requests(400, np.full(400, world.config.now_day))
        batch, streams, _ = sim.logged_pages(users, ctx, history)
        for row in range(len(users)):
            sim.history.append(int(users[row]), batch.items[row][streams[row] > 0])
    return sim.requests(count, np.full(count, world.config.now_day))


def test_knowing_every_factor_is_the_oracle_and_estimating_them_costs_value():
    world = World(WorldConfig(num_items=400, num_users=40, seed=7))
    response = ResponseModel(world)
    users, ctx, history = _requests(world)
    cfg = world.config
    oracle = response.expected_engagement(PageBatch(users, ctx, history, *OraclePolicy(response).build(
        users, ctx, history, cfg.num_shelves, cfg.max_items)))
    np.testing.assert_allclose(informed_oracle_values(response, users, ctx, history, FACTORS), oracle)
    estimated = informed_oracle_values(response, users, ctx, history, ())
    assert estimated.mean() < oracle.mean()
    assert np.all(estimated <= 1.2 * oracle + 1e-6)  # greedy is not optimal: wrong beliefs may gain a little, never much
    # Estimates from the history track the truth: the history's top genre is among the user's likely ones.
    guess = estimate_users(world, history)
    assert guess["genre_taste"].shape == (len(users), len(GENRES))
    np.testing.assert_allclose(guess["genre_taste"].sum(axis=1), 1.0, rtol=1e-5)
    taste_of_guess = world.users.genre_taste[users, guess["genre_taste"].argmax(axis=1)]
    assert taste_of_guess.mean() > 2.0 / len(GENRES)


def test_page_ceiling_script_prints_and_writes_the_table(tiny_world_dir, tmp_path, capsys):
    from scripts.page_ceiling import main

    out = os.path.join(tmp_path, "ceiling.json")
    assert main(["--world", tiny_world_dir, "--max_users", "8", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "user state estimated from the history" in printed
    with open(out) as f:
        table = json.load(f)
    assert table["rows"][0]["of_oracle"] == 1.0
    assert 0.0 < table["rows"][1]["of_oracle"] < 1.0
    assert len(table["per_request"]["oracle (user state known)"]) == 8
    assert main(["--world", str(tmp_path)]) == 2

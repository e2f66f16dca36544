"""In-session regeneration: the world's sampled events (streams as sample_streams draws them, skips beside
them), its memory of skips, and scripts/session_eval.py end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT


def test_sampled_events_and_skip_memory():
    from homegen.data.simulator.response import SKIP_PENALTY, PageBatch, ResponseModel
    from homegen.data.simulator.simulate import Simulator
    from homegen.data.simulator.world import World, WorldConfig

    world = World(WorldConfig(num_items=300, num_users=40, seed=4))
    sim = Simulator(world)
    users, ctx, history = sim.requests(64, np.full(64, world.config.now_day))
    batch, _, _ = sim.logged_pages(users, ctx, history)
    response = ResponseModel(world)
    streams, skips = response.sample_events(batch, np.random.default_rng(7))
    np.testing.assert_array_equal(streams, response.sample_streams(batch, np.random.default_rng(7)))
    assert not (streams & skips).any() and skips.sum() > streams.sum() > 0
    assert not skips[batch.items < 0].any()
    # An item skipped earlier in the session keeps its examination and shelf factors and loses stream probability.
    first = batch.items[:, 0, :1]
    skipped = PageBatch(batch.users, batch.contexts, batch.history, batch.shelves, batch.items, first)
    p, q = response.slot_probabilities(batch), response.slot_probabilities(skipped)
    np.testing.assert_allclose(q[:, 1:], p[:, 1:])
    logit = lambda x: np.log(x / (1 - x))  # noqa: E731
    _, engage, item_prob = response.components(batch)
    _, _, item_prob_skipped = response.components(skipped)
    np.testing.assert_allclose(logit(item_prob[:, 0, 0]) - logit(item_prob_skipped[:, 0, 0]), SKIP_PENALTY, rtol=1e-6)


def test_session_eval_end_to_end(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "scripts/session_eval.py", "--checkpoint", tiny_checkpoint,
                             "--max_users", "6", "--latency_requests", "2", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.load(open(os.path.join(tmp_path, "session.json")))
    assert out["requests"] == 6 and out["split"] == "validation"
    assert out["events_per_session"] == pytest.approx(out["streams_per_session"] + out["skips_per_session"])
    assert out["skipped_items_shown_again"] == 0  # skipped items are excluded from the regenerated page
    assert out["gain"] == pytest.approx(out["regenerated_page"] - out["first_page_again"], abs=1e-9)
    # After skips the first page is worth less than before them (its skipped items lost probability).
    assert out["first_page_again"] < out["first_page_before_events"]
    assert out["latency_cold_ms"]["median"] > 0 and out["latency_regenerate_ms"]["p90"] > 0
    assert "regenerated - shown again" in result.stdout

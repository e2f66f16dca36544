"""Evaluation: ranking metrics on hand-computed cases, the ranker's conventions, and the page evaluator."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from training.evaluation import ranking_metrics
from training.page_quality import _log_metrics


def test_ranking_metrics_hand_computed():
    m = ranking_metrics(np.array([0, 1, 4, 10, 60]), ks=(1, 5, 50))
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["hr@50"] == pytest.approx(4 / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 11 + 1 / 61) / 5)
    # K larger than the catalog: every rank counts as a hit.
    assert ranking_metrics(np.array([0, 2]), ks=(100,))["hr@100"] == 1.0


def test_ranker_ties_and_seen_items(tiny_checkpoint):
    import jax
    import jax.numpy as jnp

    from data.formats import UserSequence
    from serving.engine import PageEngine
    from training.evaluation import NextItemRanker
    from configs.demo import get_config
    from model.sharding import make_mesh
    from training.state import Trainer

    engine = PageEngine(tiny_checkpoint)
    cfg = get_config()
    trainer = Trainer(engine.model_cfg, cfg.train, make_mesh((1, 1, 1), jax.devices()[:1]), [tuple(r) for r in cfg.rules])
    ranker = NextItemRanker(trainer, engine.vocab, 64, 4)
    params = jax.device_put(engine.params, trainer.param_shardings)
    items = engine.vocab.items.item_ids
    users = [UserSequence("a", items[:5] + [items[7]]), UserSequence("b", [items[3], items[9], items[3]])]
    kept = ranker.rank(params, users)
    filtered = ranker.rank(params, users, filter_seen=True)
    assert np.all(filtered <= kept)
    # User b's target is also in its history: filtering must not remove the target itself.
    assert filtered[1] >= 0
    # Equal-scoring zero parameters: every item ties with the target, which then ranks last.
    zero = jax.tree.map(jnp.zeros_like, params)
    assert np.all(ranker.rank(zero, users) == engine.vocab.items.num_tokens - 1)


def test_log_metrics():
    page = [{"shelf": "a", "items": ["x", "y"]}, {"shelf": "b", "items": ["z"]}]
    recall, ndcg = _log_metrics(page, ["y", "q"])
    assert recall == 0.5 and ndcg == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert np.isnan(_log_metrics(page, [])[0])


def test_page_evaluator_end_to_end(tiny_checkpoint):
    result = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", tiny_checkpoint,
                             "--max_users", "8"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(tiny_checkpoint, "eval", "results.json")) as f:
        out = json.load(f)
    pages = out["pages"]
    assert pages["oracle"]["of_oracle"] == 1.0
    for name in ("homegen beam search", "homegen sampling", "pointwise (same model)", "logging policy"):
        assert pages[name]["valid_rate"] == 1.0
        assert 0 < pages[name]["of_oracle"] < 1.0
    assert "homegen beam search" in result.stdout
    for png in ("metrics.png", "training.png"):
        assert os.path.getsize(os.path.join(tiny_checkpoint, "eval", png)) > 5000


def test_page_engagement_equals_the_worlds_own(tiny_checkpoint):
    """The evaluator's conversion of a served page gives the world's own expected engagement."""
    from data.response import PageBatch, ResponseModel
    from data.simulate import Simulator
    from serving.engine import PageEngine
    from training.page_quality import PageArrays

    engine = PageEngine(tiny_checkpoint)
    world = engine.eligibility.world
    sim = Simulator(world)
    users, ctx, history = sim.requests(3, np.full(3, world.config.now_day))
    batch, _ = sim.logged_pages(users, ctx, history)
    arrays = PageArrays(engine, world.config.num_shelves, world.config.max_items)
    from data.simulate import page_record

    converted = [arrays.convert(page_record(world, batch, r, None, "x", 0)["page"]) for r in range(3)]
    again = PageBatch(users, ctx, history, np.stack([c[0] for c in converted]), np.stack([c[1] for c in converted]))
    response = ResponseModel(world)
    np.testing.assert_allclose(response.expected_engagement(again), response.expected_engagement(batch))

"""Evaluation: ranking metrics on hand-computed cases, the ranker's conventions, and the page evaluator."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from homegen.evaluation.pages import _log_metrics
from homegen.training.validation import ranking_metrics


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

    from homegen.configs.demo import get_config
    from homegen.data.formats import UserSequence
    from homegen.model.sharding import make_mesh
    from homegen.serving.engine import PageEngine
    from homegen.training.state import Trainer
    from homegen.training.validation import NextItemRanker

    engine = PageEngine(tiny_checkpoint)
    cfg = get_config()
    trainer = Trainer(engine.model_cfg, cfg.train, make_mesh((1, 1, 1), jax.devices()[:1]), [tuple(r) for r in cfg.rules])
    ranker = NextItemRanker(trainer, engine.vocab, 64, 4)
    params = jax.device_put(engine.params, trainer.param_shardings)
    items = engine.vocab.items.item_ids
    users = [UserSequence("a", items[:5] + [items[7]]), UserSequence("b", [items[3], items[9], items[3]])]
    kept = ranker.rank(params, users)
    filtered = ranker.rank(params, users, filter_seen=True)
    assert filtered[0] <= kept[0] and np.isfinite(kept[1]) and np.isinf(filtered[1])
    # Equal-scoring zero parameters: every item ties with the target, which then ranks last among the items
    # left. Kept: all N items. Filtered: user a loses its 5 history items; user b's target is also in its
    # history, and filtering masks every history item (RecBole's convention), so it is never ranked.
    n = engine.vocab.items.num_tokens
    zero = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_array_equal(ranker.rank(zero, users), [n - 1, n - 1])
    np.testing.assert_array_equal(ranker.rank(zero, users, filter_seen=True), [n - 6, np.inf])


def test_log_metrics():
    page = [{"shelf": "a", "items": ["x", "y"]}, {"shelf": "b", "items": ["z"]}]
    recall, ndcg = _log_metrics(page, ["y", "q"])
    assert recall == 0.5 and ndcg == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert np.isnan(_log_metrics(page, [])[0])


def oracle_streams_of_requests(tfds_dir: str, count: int) -> float:
    """The oracle's mean expected streams on the world's first `count` held-out requests, one request at a
    time from its JSON (the evaluator batches them): a reference for the evaluator's oracle row."""
    from homegen.data.builders import SyntheticWorldDataset
    from homegen.data.simulator.policies import OraclePolicy
    from homegen.data.simulator.response import PageBatch, ResponseModel
    from homegen.data.simulator.world import World, WorldConfig, parse_context

    folder = SyntheticWorldDataset(config="tiny", data_dir=tfds_dir).world_dir()
    with open(os.path.join(folder, "world.json")) as f:
        world = World(WorldConfig(**json.load(f)))
    response = ResponseModel(world)
    oracle, cfg, values = OraclePolicy(response), world.config, []
    with open(os.path.join(folder, "requests.jsonl")) as f:
        for _, line in zip(range(count), f):
            request = json.loads(line)
            user = world.user_index(request["user_id"])
            ctx = parse_context(world.users, user, request.get("context", {}))
            history = np.full(cfg.history_len, -1, np.int32)
            ids = [world.item_index(i) for i in request["history"]][-cfg.history_len:]
            history[len(history) - len(ids):] = ids
            shelves, items = oracle.build_one(user, ctx, history, cfg.num_shelves, cfg.max_items)
            batch = PageBatch(np.array([user]), ctx, history[None], shelves[None], items[None])
            values.append(float(response.expected_engagement(batch)[0]))
    return float(np.mean(values))


def test_page_evaluator_end_to_end(tiny_checkpoint, tfds_dir):
    result = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", tiny_checkpoint,
                             "--max_users", "8", "--watch_shelf", "new_releases"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results_path = os.path.join(tiny_checkpoint, "eval", "results.json")
    with open(results_path) as f:
        out = json.load(f)
    pages = out["pages"]
    # The oracle builds each request's page under the true response model: no method's pages beat it, the
    # logging policy's clearly not, and every row's fraction is its streams over the oracle's.
    oracle = pages["oracle"]["expected_streams"]
    assert oracle == pytest.approx(oracle_streams_of_requests(tfds_dir, 8), rel=1e-5)
    assert oracle > 1.2 * pages["logging policy"]["expected_streams"]
    for name, row in pages.items():
        assert row["expected_streams"] <= oracle, name
        assert row["of_oracle"] == pytest.approx(row["expected_streams"] / oracle)
    # The checkpoint has a value head: beam search maximises predicted streams, and the table also has
    # likelihood beam search and the value head's pointwise pages.
    for name in ("homegen beam search (streams)", "homegen beam search (likelihood)", "homegen sampling",
                 "pointwise (same model)", "pointwise (value head)", "logging policy"):
        assert pages[name]["valid_rate"] == 1.0
        assert 0 < pages[name]["of_oracle"] < 1.0
    # Model-based pages are asked for full shelves, as the oracle's are.
    assert out["full_shelves"] and pages["homegen beam search (streams)"]["items_per_page"] == 6 * 10
    assert pages["logging policy"]["items_per_page"] < 6 * 10
    assert all(pages[name]["predicted_streams"] > 0 for name in ("logging policy", "pointwise (value head)"))
    # The logging policy asked for full shelves is a row; each beam search is paired with the pointwise
    # baseline that fills its own shelves.
    assert 0 < pages["logging policy (full shelves)"]["of_oracle"] < 1
    # Every model's pages beat random valid pages of the same size by a clear margin (pages a broken decoder
    # or an untrained model would give stay near the random row).
    floor = pages["random (full shelves)"]["expected_streams"]
    for name in ("homegen beam search (streams)", "homegen beam search (likelihood)", "pointwise (same model)"):
        assert pages[name]["expected_streams"] > 1.3 * floor, (name, pages[name]["expected_streams"], floor)
    assert pages["pointwise (likelihood shelves)"]["valid_rate"] == 1.0
    for beam, partner in (("homegen beam search (streams)", "pointwise (same model)"),
                          ("homegen beam search (likelihood)", "pointwise (likelihood shelves)")):
        gain = np.subtract(pages[beam]["per_request"], pages[partner]["per_request"]).mean()
        assert pages[beam]["vs_pointwise"] == pytest.approx(gain, abs=1e-4)
    assert "homegen beam search (streams)" in result.stdout
    for png in ("metrics.png", "training.png"):
        assert os.path.getsize(os.path.join(tiny_checkpoint, "eval", png)) > 5000
    # Per-request values (for paired comparisons) and the watched shelf's use.
    for name in ("homegen beam search (streams)", "logging policy", "oracle"):
        assert len(pages[name]["per_request"]) == 8
        assert np.mean(pages[name]["per_request"]) == pytest.approx(pages[name]["expected_streams"], abs=1e-4)
    assert 0 <= pages["logging policy"]["shelf_on_pages"] <= 1 and "watched shelf type: new_releases" in result.stdout
    assert pages["logging policy"]["shelf_streams"] <= pages["logging policy"]["expected_streams"]
    compare_pages_between(results_path, out)


def compare_pages_between(results_path: str, out: dict) -> None:
    """scripts/compare_pages.py: B - A per method, paired over the requests, with its standard error."""
    other = json.loads(json.dumps(out))
    row = other["pages"]["homegen sampling"]
    row["per_request"] = [v + (0.5 if k % 2 else 0.1) for k, v in enumerate(row["per_request"])]
    row["expected_streams"] = float(np.mean(row["per_request"]))
    b_path = results_path.replace("results.json", "results_b.json")
    with open(b_path, "w") as f:
        json.dump(other, f)
    result = subprocess.run([sys.executable, "scripts/compare_pages.py", results_path, b_path, "--method",
                             "homegen sampling", "--method", "logging policy"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sampling = next(line for line in result.stdout.splitlines() if line.startswith("homegen sampling")).split()
    se = np.std([0.1, 0.5] * 4, ddof=1) / np.sqrt(8)
    assert float(sampling[-2]) == pytest.approx(0.3, abs=1e-3) and float(sampling[-1]) == pytest.approx(se, abs=1e-3)
    assert "+0.000" in next(line for line in result.stdout.splitlines() if line.startswith("logging policy"))
    other["requests"] = 9
    with open(b_path, "w") as f:
        json.dump(other, f)
    result = subprocess.run([sys.executable, "scripts/compare_pages.py", results_path, b_path], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "different requests" in result.stderr


def test_predicted_streams_match_the_beam_search_score(tiny_checkpoint):
    """Teacher-forced value-head streams of a streams-objective page equal the score beam search gave it."""
    from homegen.evaluation.pages import predicted_streams
    from homegen.serving.engine import PageEngine
    from homegen.serving.requests import parse_request

    engine = PageEngine(tiny_checkpoint)
    requests = [parse_request({"user_id": u, "beam_size": 2, "num_shelves": 3, "max_items_per_shelf": 4})
                for u in ("u1", "u7")]
    responses = engine.generate(requests)
    forced = predicted_streams(engine, requests, [r["page"] for r in responses])
    np.testing.assert_allclose(forced, [r["predicted_streams"] for r in responses], atol=2e-3)


def test_page_engagement_equals_the_worlds_own(tiny_checkpoint):
    """The evaluator's conversion of a served page gives the world's own expected engagement."""
    from homegen.data.simulator.response import ResponseModel
    from homegen.data.simulator.simulate import Simulator, page_record
    from homegen.evaluation.pages import WorldJudge
    from homegen.serving.engine import PageEngine

    engine = PageEngine(tiny_checkpoint)
    world = engine.eligibility.world
    sim = Simulator(world)
    users, ctx, history = sim.requests(3, np.full(3, world.config.now_day))
    batch, _, _ = sim.logged_pages(users, ctx, history)
    records = [page_record(world, batch, r, None, "x", 0) for r in range(3)]
    judge = WorldJudge(world, records)
    values = judge.slot_probabilities([r["page"] for r in records]).sum(axis=(1, 2))
    np.testing.assert_allclose(values, ResponseModel(world).expected_engagement(batch))


def train_next_item(walks_file, workdir, item_tokens):
    from homegen.training.loop import run

    cfg = next_item_config(walks_file, item_tokens)
    return run(cfg, workdir)


def next_item_config(walks_file, item_tokens):
    from homegen.configs.amazon_next_item import amazon_config

    cfg = amazon_config(walks_file)
    cfg.data.update(dict(item_tokens=item_tokens, item_attributes=False))  # the walks have no attribute file
    cfg.data.semantic_codes = 4
    cfg.data.semantic_levels = 2
    cfg.data.seq_len = 40
    cfg.model.update(dict(d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, dropout=0.0))
    cfg.train.update(dict(steps=150, batch_size=16, eval_every=150, checkpoint_every=150, log_every=50,
                          warmup_steps=10, learning_rate=1e-2, eval_batches=1))
    cfg.eval.update(dict(max_users=0, beam_size=20))
    return cfg


@pytest.mark.parametrize("item_tokens", ["atomic", "semantic"])
def test_next_item_training_and_evaluation_end_to_end(walks_file, tmp_path, item_tokens, monkeypatch):
    """Both item-token modes learn the walks (HR@10 far above the 1/6 of guessing within a 60-item
    catalog), evaluate.py reports both seen conventions, and for atomic items ranking by beam search
    agrees with scoring every item. Trained with the data file given relative to one directory, the run
    keeps it absolute and evaluates from another."""
    workdir = str(tmp_path / item_tokens)
    monkeypatch.chdir(os.path.dirname(walks_file))
    out = train_next_item(os.path.basename(walks_file), workdir, item_tokens)
    assert out.metrics["validation_hr@10"] > 0.6
    from homegen.training.checkpoints import Checkpoints

    _, meta = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True).read_meta()
    assert meta["config"]["data"]["interactions"] == walks_file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--checkpoint", workdir],
                            cwd=str(elsewhere), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        summary = json.load(f)
    rankings = summary["rankings"]
    methods = ["score", "beam"] if item_tokens == "atomic" else ["beam"]
    assert sorted(rankings) == sorted(f"{m}, seen {c}" for m in methods for c in ("kept", "filtered"))
    assert summary["item_tokens"] == item_tokens and summary["users"] == 240
    assert summary["epochs"] > 1 and summary["training_seconds"] > 0
    for metrics in rankings.values():
        assert metrics["hr@10"] > 0.6
    if item_tokens == "atomic":
        for convention in ("kept", "filtered"):
            score, beam = rankings[f"score, seen {convention}"], rankings[f"beam, seen {convention}"]
            for k in ("hr@5", "ndcg@10", "hr@20"):
                assert beam[k] == pytest.approx(score[k], abs=1e-6)
    assert "TIGER" not in result.stdout and f"{item_tokens} item tokens" in result.stdout
    # The seen filter masks every history item, as RecBole and eSASRec do: a target the user already had is
    # never ranked (a miss) with seen items filtered, and ranked as usual with them kept. (The Amazon Sports
    # and Toys files hold no such user: 0 of 55,010.)
    from homegen.data.formats import UserSequence
    from homegen.training.validation import make_ranker

    ranker = make_ranker(out.trainer, out.vocab, next_item_config(walks_file, item_tokens))
    walk = [str(k) for k in range(3, 9)]
    repeated = [UserSequence("r", walk + ["4"]), UserSequence("n", walk + ["9"])]
    kept = ranker.rank(out.state["params"], repeated)
    filtered = ranker.rank(out.state["params"], repeated, filter_seen=True)
    assert np.isinf(filtered[0]) and np.isfinite(filtered[1]) and filtered[1] < 10
    if item_tokens == "atomic":  # scoring ranks every item; beam search only the 20 it finds
        assert np.isfinite(kept[0])


def test_page_requests_split_into_disjoint_test_and_validation_blocks(tmp_path):
    from homegen.evaluation.pages import read_split

    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"k": k}) + "\n" for k in range(10)))
    assert [r["k"] for r in read_split(str(path), 3)] == [0, 1, 2]
    assert [r["k"] for r in read_split(str(path), 3, "validation")] == [7, 8, 9]
    with pytest.raises(ValueError, match="too few"):
        read_split(str(path), 6, "validation")


def test_data_paths_become_absolute_and_a_missing_file_names_its_flag(tmp_path, monkeypatch):
    from homegen.configs.amazon_toys import get_config
    from homegen.training.data import absolute_data_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    cfg = get_config()
    cfg.data.interactions, cfg.data.page_logs, cfg.data.data_dir = "", "a.jsonl,b.jsonl", "tfds"
    absolute_data_paths(cfg.data)
    assert cfg.data.page_logs == f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl" and cfg.data.data_dir == f"{tmp_path}/tfds"
    cfg.data.catalog = "missing.jsonl"
    with pytest.raises(FileNotFoundError, match=r"data.catalog: .*missing.jsonl does not exist \(set --config.data.catalog=FILE\)"):
        absolute_data_paths(cfg.data)
    # The Amazon configs name the project's data beside the checkout, from any directory.
    assert os.path.isabs(get_config().data.interactions)
    assert get_config().data.interactions.endswith(os.path.join("shared", "data", "amazon", "Toys_and_Games.txt"))

"""The preference (DPO) stage: its loss on a toy case, pairs made from a checkpoint, and train.py's stage."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from homegen.model.loss import PreferenceConfig, preference_loss


def test_preference_loss_is_log2_at_the_reference_and_falls_with_the_margin():
    cfg = PreferenceConfig(beta=0.5, value_weight=0.0)
    mask = jnp.ones((4, 3))
    token_logp = jnp.log(jnp.full((4, 3), 0.5))  # every page: log-prob 3 log 0.5
    ref = jnp.full((2, 2), 3 * np.log(0.5))
    loss, pairs, aux = preference_loss(token_logp, mask, ref, cfg)
    assert float(pairs) == 2 and float(loss) == pytest.approx(2 * np.log(2.0), rel=1e-6)
    # The chosen pages (rows 0 and 2) gain 1 nat over the reference, the rejected lose 1: margin 0.5 x 2.
    moved = token_logp + jnp.array([1.0, -1.0, 1.0, -1.0])[:, None] / 3
    loss, _, aux = preference_loss(moved, mask, ref, cfg)
    assert float(loss) == pytest.approx(2 * np.log1p(np.exp(-1.0)), rel=1e-5)
    assert float(aux["accuracy_sum"]) == 2 and float(aux["margin_sum"]) == pytest.approx(2.0, rel=1e-5)
    # The value term is 0 when the head predicts its targets, positive otherwise; unlabelled tokens are ignored.
    targets = jnp.array([[0.2, -1.0, 0.7]] * 4)
    logits = jnp.log(targets / (1 - targets))
    with_value = PreferenceConfig(beta=0.5, value_weight=1.0)
    agree, _, aux = preference_loss(moved, mask, ref, with_value, logits, targets)
    assert float(aux["value_count"]) == 8 and float(aux["value_sum"]) == pytest.approx(0.0, abs=1e-5)
    off, _, _ = preference_loss(moved, mask, ref, with_value, logits + 1.0, targets)
    assert float(off) > float(agree) == pytest.approx(float(loss), rel=1e-5)


def _toy_pairs(trainer, params, rng, n: int):
    """n pairs of one prompt: chosen = the pages of shelf 5 holding item 9, rejected = item 10 (tokens < 16)."""
    from homegen.model.scoring import score_tokens
    from homegen.training.preference import PreferencePairs

    prompts = [[1, 2, int(rng.integers(11, 16)), 3] for _ in range(n)]
    tokens = np.zeros((n, 2, 8), np.int32)
    for k, prompt in enumerate(prompts):
        tokens[k, 0, :7] = prompt + [5, 9, 2]
        tokens[k, 1, :7] = prompt + [5, 10, 2]
    lengths = np.full((n, 2), 7, np.int32)
    page_mask = np.zeros((n, 2, 8), np.float32)
    page_mask[:, :, 4:7] = 1.0
    logp, _ = score_tokens(trainer.graphdef, params, jnp.asarray(tokens.reshape(2 * n, 8)),
                           jnp.asarray(lengths.reshape(-1)))
    ref = (np.asarray(logp) * page_mask.reshape(2 * n, 8)[:, 1:]).sum(-1).reshape(n, 2)
    return PreferencePairs(tokens, lengths, page_mask, np.full(tokens.shape, -1.0, np.float32), ref, {})


def test_dpo_steps_lower_the_loss_and_move_the_policy_to_the_chosen_page():
    """A toy case on 8 devices: from log 2 at the start (policy = reference), the loss falls and the chosen
    page's item gains probability over the rejected one's."""
    from ml_collections import ConfigDict

    from homegen.model.scoring import score_tokens
    from homegen.model.sharding import make_mesh
    from homegen.model.transformer import TransformerConfig
    from homegen.training.state import Trainer

    model_cfg = TransformerConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                  mlp_dim=32, value_head=True)
    train_cfg = ConfigDict(dict(learning_rate=3e-2, warmup_steps=1, steps=30, final_lr_fraction=1.0, weight_decay=0.0,
                                clip_norm=1.0, b1=0.9, b2=0.98, grad_accum=1, freeze=""))
    trainer = Trainer(model_cfg, train_cfg, make_mesh((-1, 1, 1)), [("batch", ("data", "fsdp")), ("length", None)],
                      preference=PreferenceConfig(beta=0.5, value_weight=0.0))
    state = trainer.init_state()
    pairs = _toy_pairs(trainer, state["params"], np.random.default_rng(0), 8)
    batch = trainer.global_batch(pairs.arrays())
    first = trainer.eval_step(state["params"], batch)
    assert float(first["loss_sum"]) / 8 == pytest.approx(np.log(2.0), abs=1e-4)

    def gap(params):  # log p(item 9) - log p(item 10) after the shelf token, mean over the pairs
        logp, _ = score_tokens(trainer.graphdef, params, jnp.asarray(pairs.tokens.reshape(16, 8)),
                               jnp.asarray(pairs.lengths.reshape(-1)))
        return float(np.mean(np.asarray(logp)[0::2, 4] - np.asarray(logp)[1::2, 4]))

    before = gap(state["params"])
    losses = []
    for _ in range(30):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * np.log(2.0) and losses[-1] < losses[0]
    assert float(metrics["preference_accuracy"]) == 1.0
    assert gap(state["params"]) > before + 2.0


@pytest.fixture(scope="module")
def tiny_pairs(tiny_checkpoint, tmp_path_factory):
    from homegen.evaluation.pages import world_folder
    from homegen.evaluation.preference_pairs import logged_requests, make_pairs
    from homegen.serving.engine import PageEngine

    engine = PageEngine(tiny_checkpoint)
    world = engine.eligibility.world
    logs = os.path.join(world_folder({"config": engine.train_config}, tiny_checkpoint), "pages.jsonl")
    requests = logged_requests(logs, 24, world.config.num_shelves, 4)
    pairs, summary = make_pairs(engine, [engine], requests, samples=3, batch_size=12)
    folder = str(tmp_path_factory.mktemp("pairs"))
    pairs.save(folder)
    return folder, engine, requests, summary


def test_pairs_rank_candidates_by_the_value_head_and_carry_the_reference(tiny_pairs, tiny_checkpoint):
    from homegen.serving.requests import parse_request
    from homegen.training.preference import PreferencePairs

    folder, engine, requests, summary = tiny_pairs
    pairs = PreferencePairs.load(folder)
    assert summary["requests"] == 24 and 0 < len(pairs) == summary["pairs"] <= 24
    assert summary["mean_reward_chosen"] > summary["mean_reward_candidates"] > summary["mean_reward_rejected"]
    assert pairs.meta["checkpoint"] == os.path.abspath(tiny_checkpoint)
    vocab = engine.vocab
    for k in range(min(len(pairs), 4)):
        scored = []
        for side in range(2):
            tokens = pairs.tokens[k, side, :pairs.lengths[k, side]].tolist()
            body = tokens[tokens.index(3) + 1:]  # after PAGE
            assert pairs.page_mask[k, side].sum() == len(body)
            page = [{"shelf": s.shelf, "items": s.items} for s in vocab.decode_page(body)]
            request = parse_request(next(r for r in requests if engine.prompt(parse_request(r)) == tokens[:-len(body)]))
            out = engine.score([request], [page])[0]
            assert out["log_prob"] == pytest.approx(pairs.ref_log_probs[k, side], abs=1e-3)
            labelled = pairs.values[k, side][pairs.values[k, side] >= 0]
            assert labelled.tolist() == pytest.approx([p for s in out["page"] for p in s["stream_probs"]], abs=1e-3)
            scored.append(out["predicted_streams"])
        assert scored[0] > scored[1]  # the chosen page has the higher predicted streams


def test_preference_stage_trains_from_the_run_that_made_the_pairs(tiny_pairs, tiny_checkpoint, tfds_dir, tmp_path):
    from homegen.configs.demo import get_config
    from homegen.serving.engine import PageEngine
    from homegen.serving.requests import parse_request
    from homegen.training.loop import TrainingError, run

    folder, engine, requests, _ = tiny_pairs
    cfg = get_config("preference")
    cfg.model.update(engine.train_config["model"])
    cfg.model.dropout = 0.0
    cfg.data.update({"seq_len": engine.train_config["data"]["seq_len"]})
    cfg.train.update(dict(steps=4, batch_size=8, eval_every=4, checkpoint_every=4, log_every=2, eval_batches=1))
    cfg.preference.pairs = folder
    cfg.preference.validation_fraction = 0.4
    with pytest.raises(TrainingError, match="pass --init_from"):
        run(cfg, str(tmp_path / "no_init"))
    with pytest.raises(TrainingError, match="made by"):
        run(cfg, str(tmp_path / "other"), init_from=str(tmp_path / "elsewhere"))
    stale = tmp_path / "stale_pairs"  # pairs of an older step than the one --init_from starts from
    shutil.copytree(folder, stale)
    meta = json.loads((stale / "pairs.json").read_text())
    (stale / "pairs.json").write_text(json.dumps({**meta, "step": meta["step"] - 1}))
    cfg.preference.pairs = str(stale)
    with pytest.raises(TrainingError, match="made at step"):
        run(cfg, str(tmp_path / "stale"), init_from=tiny_checkpoint)
    cfg.preference.pairs = str(tmp_path / "missing")
    with pytest.raises(TrainingError, match="preference_pairs.py"):
        run(cfg, str(tmp_path / "missing_run"), init_from=tiny_checkpoint)
    cfg.preference.pairs = folder

    result = run(cfg, str(tmp_path / "dpo"), init_from=tiny_checkpoint)
    assert result.step == 4 and np.isfinite(result.losses).all()
    assert 0.0 <= result.metrics["validation_preference_accuracy"] <= 1.0
    # At the reference every margin is 0 (loss log 2); four steps move the policy toward the chosen pages.
    assert result.metrics["reward_margin"] > 0 and result.metrics["preference_accuracy"] > 0.5
    assert "validation_loss" in result.metrics and "validation_preference_loss" in result.metrics
    assert cfg.data.data_dir == tfds_dir  # the data of the run that made the pairs
    tuned = PageEngine(str(tmp_path / "dpo"))
    page = tuned.generate([parse_request(requests[0])])[0]
    assert "error" not in page and page["page"]


def test_pair_batches_resume_exactly_and_split_the_global_batch_over_processes():
    from homegen.training.preference import PreferencePairs, pair_dataset

    n = 20
    tokens = np.arange(n * 2 * 3, dtype=np.int32).reshape(n, 2, 3)
    pairs = PreferencePairs(tokens, np.full((n, 2), 3, np.int32), np.ones((n, 2, 3), np.float32),
                            np.full((n, 2, 3), -1.0, np.float32), np.zeros((n, 2), np.float32), {})
    iterator = iter(pair_dataset(pairs, 4, seed=0))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["tokens"] for _ in range(4)]  # across an epoch boundary (5 batches per epoch)
    resumed = iter(pair_dataset(pairs, 4, seed=0))
    resumed.set_state(state)
    assert all(np.array_equal(next(resumed)["tokens"], e) for e in expected)
    first = next(iter(pair_dataset(pairs, 4, seed=0)))["tokens"]
    halves = [next(iter(pair_dataset(pairs, 2, seed=0, shard_index=k, shard_count=2)))["tokens"] for k in range(2)]
    assert np.array_equal(np.concatenate(halves), first)
    with pytest.raises(ValueError, match="ref_log_probs"):
        PreferencePairs(tokens, pairs.lengths, pairs.page_mask, pairs.values, np.zeros((n, 3), np.float32), {})


def test_reward_models_name_a_run_or_one_of_its_steps(tiny_checkpoint):
    from homegen.serving.engine import PageEngine
    from homegen.training.checkpoints import CheckpointError
    from scripts.preference_pairs import _reward_engines

    policy = PageEngine(tiny_checkpoint)
    specs = [tiny_checkpoint, f"{tiny_checkpoint}@{policy.step}"]
    assert _reward_engines(specs, policy, tiny_checkpoint, None) == [policy, policy]
    assert _reward_engines(None, policy, tiny_checkpoint, None) == [policy]
    with pytest.raises(ValueError, match="whole number"):
        _reward_engines([f"{tiny_checkpoint}@last"], policy, tiny_checkpoint, None)
    with pytest.raises(CheckpointError):
        _reward_engines([f"{tiny_checkpoint}@{policy.step + 1}"], policy, tiny_checkpoint, None)

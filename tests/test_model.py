import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from homegen.model.loss import SampledSoftmax, full_softmax_loss, sampled_softmax_loss, value_loss
from homegen.model.transformer import KVCache, Transformer, TransformerConfig, causal_segment_attention

CFG = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


def inputs(batch=2, length=12, seed=0):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(1, 61, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return tokens, positions, jnp.ones((batch, length), jnp.int32)


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "dots")])
def test_kv_cache_decoding_matches_full_forward(scan, remat):
    cfg = TransformerConfig(**CFG, scan_layers=scan, remat=remat)
    model = Transformer(cfg, nnx.Rngs(0))
    tokens, positions, segments = inputs()
    full, _ = model(tokens, positions, segments)
    cache = KVCache.zeros(cfg, 2, 16)
    pieces = []
    logits, cache = model(tokens[:, :7], positions[:, :7], segments[:, :7], cache)  # prefill
    pieces.append(logits)
    for t in range(7, 12):  # one token at a time
        logits, cache = model(tokens[:, t:t + 1], positions[:, t:t + 1], segments[:, t:t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-4)
    assert int(cache.index) == 12


def test_causal_and_packed_masking():
    model = Transformer(TransformerConfig(**CFG), nnx.Rngs(1))
    tokens, positions, segments = inputs(batch=1, length=10)
    base, _ = model(tokens, positions, segments)
    changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % 61)
    after, _ = model(changed, positions, segments)
    np.testing.assert_allclose(after[0, :6], base[0, :6], atol=1e-6)  # the future is invisible
    assert not np.allclose(after[0, 6:], base[0, 6:])
    # Two packed sequences do not see each other: segment 2 equals that sequence run alone.
    seg = jnp.array([[1] * 4 + [2] * 6])
    pos = jnp.array([list(range(4)) + list(range(6))])
    packed, _ = model(tokens, pos, seg)
    alone, _ = model(tokens[:, 4:], positions[:, :6], segments[:, :6])
    np.testing.assert_allclose(packed[:, 4:], alone, atol=1e-5)


def test_fused_attention_form_equals_the_masked_form():
    """The form handed to cuDNN's fused kernel (causal as the kernel's mask type, segments as a mask shared
    by the heads) computes what the dense causal-and-segment mask computes, packed rows and padding
    included (run here through XLA: the kernel needs a GPU; scripts/gpu_checks.sh compares them there)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(3, 10, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, 10, 2, 8)), jnp.float32) for _ in range(2))
    segments = jnp.asarray([[1] * 10, [1, 1, 1, 1, 2, 2, 2, 2, 2, 0], [1, 1, 2, 2, 2, 3, 0, 0, 0, 0]], jnp.int32)
    slot = jnp.arange(10)
    mask = ((slot[None, :] <= slot[:, None])[None] & (segments[:, :, None] == segments[:, None, :])
            & (segments[:, None, :] > 0)) | jnp.eye(10, dtype=bool)[None]
    dense = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    fused_form = causal_segment_attention(q, k, v, segments, implementation="xla")
    np.testing.assert_allclose(fused_form, dense, atol=1e-6)
    # and segment 2 of row 1 equals that sequence alone
    alone = causal_segment_attention(q[1:2, 4:9], k[1:2, 4:9], v[1:2, 4:9], jnp.ones((1, 5), jnp.int32))
    np.testing.assert_allclose(fused_form[1:2, 4:9], alone, atol=1e-6)


def test_fused_attention_falls_back_to_xla_off_gpu():
    """fused_attention=True on a CPU (or in float32) computes with XLA's attention: same numbers."""
    tokens, positions, segments = inputs()
    plain = Transformer(TransformerConfig(**CFG), nnx.Rngs(0))
    fused = Transformer(TransformerConfig(**CFG, fused_attention=True), nnx.Rngs(0))
    np.testing.assert_array_equal(fused(tokens, positions, segments)[0], plain(tokens, positions, segments)[0])


def test_param_count_and_untied_head():
    cfg = TransformerConfig(**{**CFG, "tie_embeddings": False})
    model = Transformer(cfg, nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model))) == cfg.num_params()
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TransformerConfig(**{**CFG, "num_kv_heads": 3})


def test_value_head():
    cfg = TransformerConfig(**CFG, value_head=True)
    model = Transformer(cfg, nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model))) == cfg.num_params()
    tokens, positions, segments = inputs()
    hidden, _ = model.hidden(tokens, positions, segments)
    every = model.values(hidden)
    assert every.shape == (2, 12, 61)
    targets = jnp.roll(tokens, -1, axis=1)
    picked = model.values(hidden, targets)
    np.testing.assert_allclose(picked, jnp.take_along_axis(every, targets[..., None], -1)[..., 0], atol=1e-5)
    # The loss is the binary cross-entropy over labelled positions only (1 skipped, 2 streamed).
    outcomes = jnp.zeros((2, 12), jnp.int32).at[0, 3].set(2).at[1, 5].set(1).at[1, 7].set(2)
    total, count = value_loss(model, hidden, targets, outcomes)
    p = jax.nn.sigmoid(picked)
    expected = -np.log(p[0, 3]) - np.log(1 - p[1, 5]) - np.log(p[1, 7])
    assert count == 3 and float(total) == pytest.approx(float(expected), rel=1e-5)


def _matmul_operand_types(dtype: str) -> list[str]:
    """The operand types of every matmul (dot_general) in the compiled forward pass of a model in `dtype`."""
    graphdef, state = nnx.split(Transformer(TransformerConfig(**CFG, dtype=dtype), nnx.Rngs(0)))
    text = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)[0]).lower(state, *inputs()).as_text()
    return [line.split(" : ")[-1].split("->")[0] for line in text.splitlines() if "dot_general" in line]


def test_bf16_compute_keeps_fp32_params():
    model = Transformer(TransformerConfig(**CFG, dtype="bfloat16"), nnx.Rngs(0))
    logits, _ = model(*inputs())
    assert logits.dtype == jnp.float32 and model.embed[...].dtype == jnp.float32
    full, _ = Transformer(TransformerConfig(**CFG), nnx.Rngs(0))(*inputs())
    assert np.corrcoef(np.ravel(logits), np.ravel(full))[0, 1] > 0.99
    # What runs: every matmul of the bf16 model reads bf16 operands (fp32 parameters cast on the way in),
    # none of the fp32 model's does.
    bf16, fp32 = _matmul_operand_types("bfloat16"), _matmul_operand_types("float32")
    assert len(bf16) == len(fp32) >= 8
    assert all(t.count("xbf16>") == 2 for t in bf16) and not any("bf16" in t for t in fp32)


def next_token_setup(batch: int, length: int):
    """A fresh model, its hidden states of random tokens, and the next tokens as targets."""
    model = Transformer(TransformerConfig(**CFG), nnx.Rngs(0))
    tokens, positions, segments = inputs(batch=batch, length=length)
    hidden, _ = model.hidden(tokens, positions, segments)
    return model, hidden, jnp.roll(tokens, -1, axis=1)


def test_sampled_softmax_approaches_full_softmax():
    model, hidden, targets = next_token_setup(batch=4, length=12)
    weights = jnp.ones(targets.shape)
    full = full_softmax_loss(model, hidden, targets, weights)[0]
    sampler = SampledSoftmax.create(item_offset=21, item_counts=np.ones(40), num_negatives=4000, sampler="uniform")
    sampled = sampled_softmax_loss(model, hidden, targets, weights, sampler, jax.random.key(0))[0]
    assert abs(float(sampled) - float(full)) / float(full) < 0.02
    few = SampledSoftmax.create(21, np.arange(40), 8, "popularity")
    small = sampled_softmax_loss(model, hidden, targets, weights, few, jax.random.key(1))[0]
    assert np.isfinite(float(small)) and float(small) < float(full)


def test_chunked_full_softmax_equals_the_full_softmax():
    model, hidden, targets = next_token_setup(batch=3, length=10)
    weights = jnp.asarray(np.random.default_rng(0).random(targets.shape), jnp.float32)
    full = full_softmax_loss(model, hidden, targets, weights)
    for chunk in (7, 16, CFG["vocab_size"] - 1):  # ragged last chunks, and a last chunk of one token
        chunked = full_softmax_loss(model, hidden, targets, weights, chunk=chunk)
        np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5)
        assert chunked[1] == full[1]


def test_label_smoothing_is_cross_entropy_against_the_smoothed_target():
    model, hidden, targets = next_token_setup(batch=2, length=6)
    weights = jnp.asarray(np.random.default_rng(1).random(targets.shape), jnp.float32)
    log_p = np.asarray(jax.nn.log_softmax(model.logits(hidden), axis=-1), np.float64)
    vocab, eps = CFG["vocab_size"], 0.2
    smoothed = np.full(log_p.shape, eps / vocab) + (1 - eps) * np.eye(vocab)[np.asarray(targets)]
    expected = np.sum(-np.sum(smoothed * log_p, axis=-1) * np.asarray(weights))
    total, weight = full_softmax_loss(model, hidden, targets, weights, label_smoothing=eps)
    assert float(total) == pytest.approx(expected, rel=1e-5) and float(weight) == pytest.approx(float(weights.sum()))
    expected_plain = -np.sum(np.take_along_axis(log_p, np.asarray(targets)[..., None], -1)[..., 0] * np.asarray(weights))
    assert float(full_softmax_loss(model, hidden, targets, weights)[0]) == pytest.approx(expected_plain, rel=1e-5)
    with pytest.raises(ValueError, match="evaluation"):
        full_softmax_loss(model, hidden, targets, weights, chunk=7, label_smoothing=eps)


def test_negatives_follow_the_sampling_distribution():
    counts = np.array([0, 1, 10, 100, 1000, 5], np.float64)
    sampler = SampledSoftmax.create(item_offset=3, item_counts=counts, num_negatives=2_000_000, sampler="popularity")
    drawn = np.bincount(np.asarray(sampler.draw(jax.random.key(0))), minlength=len(counts))
    expected = np.exp(sampler.item_log_probs) * sampler.num_negatives
    assert drawn.sum() == sampler.num_negatives
    np.testing.assert_allclose(drawn, expected, rtol=0.05)  # the rarest item: 8,870 expected, 1.1% s.d.


def test_embedding_dropout_acts_in_training_only():
    """embed_dropout changes a training forward and leaves evaluation, which passes no dropout key, equal to
    the model without it."""
    tokens, positions, segments = inputs(batch=4, length=12)
    plain = Transformer(TransformerConfig(**CFG), nnx.Rngs(0))
    dropped = Transformer(TransformerConfig(**CFG, embed_dropout=0.5), nnx.Rngs(0))
    np.testing.assert_array_equal(dropped(tokens, positions, segments)[0], plain(tokens, positions, segments)[0])
    key = jax.random.key(3)
    trained, _ = dropped(tokens, positions, segments, dropout_key=key)
    assert not np.allclose(trained, plain(tokens, positions, segments, dropout_key=key)[0], atol=1e-3)


def test_fused_attention_check_says_it_needs_a_gpu():
    """scripts/check_fused_attention.py (run on GPUs by scripts/gpu_checks.sh) refuses a CPU with exit 2."""
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, "scripts/check_fused_attention.py"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "no GPU" in result.stderr

"""Training throughput of a config: step time, tokens/s and model FLOPs utilisation (MFU).

    python scripts/benchmark_train.py --config configs/demo.py [--config.train.batch_size=64] \
        [--steps 20] [--peak_tflops 989]

Random token batches of the config's shape go through the real sharded train step (data loading is not
timed). MFU = model FLOPs per second / the device's peak; the peak comes from --peak_tflops, a table of
known accelerators, or, on CPU, a measured float32 matmul rate (stated in the output).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from model.sharding import make_mesh  # noqa: E402
from model.transformer import TransformerConfig  # noqa: E402
from training.state import Trainer, count_params  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A configs/<name>.py file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps (after 3 warm-up steps).")
flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: estimate from the config's data preset).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak dense TFLOP/s of one device (0: look up or measure).")
FLAGS = flags.FLAGS

# Dense bf16 peak TFLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0, "TPU v5e": 197.0}
PRESET_VOCAB = {"tiny": 1_300, "small": 11_000, "medium": 101_000, "large": 1_001_000}


def model_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (head included, embedding lookup not) + attention."""
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.mlp_dim
    matmul_params = cfg.num_layers * per_layer + cfg.vocab_size * d
    attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * hd
    return 6.0 * matmul_params + attention


def device_peak_tflops(dtype: str) -> tuple[float, str]:
    if FLAGS.peak_tflops:
        return FLAGS.peak_tflops, "given with --peak_tflops"
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return (peak if dtype == "bfloat16" else peak / 2), f"{kind} data sheet ({dtype})"
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(10):
        out = matmul(a)
    out.block_until_ready()
    rate = 10 * 2 * n ** 3 / (time.perf_counter() - start) / 1e12
    return rate, f"measured float32 {n}x{n} matmul on {kind}"


def main(argv):
    cfg = FLAGS.config
    vocab = FLAGS.vocab_size or PRESET_VOCAB.get(cfg.data.preset, 12_000)
    model_cfg = TransformerConfig(vocab_size=vocab, **cfg.model.to_dict())
    mesh = make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    trainer = Trainer(model_cfg, cfg.train, mesh, [tuple(r) for r in cfg.rules], None, cfg.seed)
    state = trainer.init_state()
    b, t = cfg.train.batch_size, cfg.data.seq_len + 1
    rng = np.random.default_rng(0)
    batch = trainer.global_batch({"tokens": rng.integers(1, vocab, (b, t)).astype(np.int32),
                                  "weights": np.ones((b, t), np.float32),
                                  "outcomes": np.zeros((b, t), np.int32),
                                  "segment_ids": np.ones((b, t), np.int32),
                                  "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))})
    for _ in range(3):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    step_time = (time.perf_counter() - start) / FLAGS.steps
    tokens = b * cfg.data.seq_len
    flops = model_flops_per_token(model_cfg, cfg.data.seq_len) * tokens / step_time
    peak, source = device_peak_tflops(cfg.model.dtype)
    devices = jax.device_count()
    print(f"{'parameters':<24}{count_params(state['params']):>16,}")
    print(f"{'devices':<24}{devices:>16} ({jax.devices()[0].device_kind})")
    print(f"{'batch x seq_len':<24}{f'{b} x {cfg.data.seq_len}':>16}")
    print(f"{'step time (ms)':<24}{step_time * 1e3:>16.1f}")
    print(f"{'tokens/s':<24}{tokens / step_time:>16,.0f}")
    print(f"{'model TFLOP/s':<24}{flops / 1e12:>16.3f}")
    print(f"{'peak TFLOP/s/device':<24}{peak:>16.3f}  ({source})")
    print(f"{'MFU':<24}{flops / 1e12 / (peak * devices):>16.1%}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)

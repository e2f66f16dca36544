"""Training throughput of a config: step time, tokens/s and model FLOPs utilisation (MFU).

    python scripts/benchmark_train.py --config configs/demo.py [--config.train.batch_size=64] \
        [--steps 20] [--peak_tflops 989] [--config.finetune.lora_rank=8] [--flops_only] [--noxla_flops] \
        [--profile_dir DIR [--profile_steps 3]]

Random token batches of the config's shape go through the real sharded train step with the config's loss
(full softmax, or sampled softmax over a Zipf-popular catalog, plus the value head's loss when the model has
one); data loading is not timed. Model FLOPs count the output layer the loss really computes: every token
for full softmax, the non-item tokens plus the sampled negatives for sampled softmax. MFU = model FLOPs per
second / the device's peak, printed for the analytic count (6 x matmul parameters per token, plus attention)
and for XLA's own count of the compiled step with its layers unrolled (its cost analysis counts a loop's
body once), which says what ran: e.g. a LoRA step computes no frozen-weight gradients, and remat recomputes.
The peak comes from --peak_tflops, a table of known accelerators, or, on CPU, a measured float32 matmul
rate (stated in the output). --profile_dir traces a few more steps with jax.profiler (TensorBoard/XProf and
Perfetto files in DIR) and prints the ops that took the most accelerator time per step.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from homegen.model.loss import SampledSoftmax
from homegen.model.sharding import make_mesh
from homegen.model.transformer import TransformerConfig
from homegen.training.loop import lora_config
from homegen.training.state import Trainer, count_params

config_flags.DEFINE_config_file("config", None, "A configs/<name>.py file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps (after 3 warm-up steps).")
flags.DEFINE_integer("items", 0, "Item tokens (0: the config's data preset's catalog size).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak dense TFLOP/s of one device (0: look up or measure).")
flags.DEFINE_bool("flops_only", False, "Print the step's analytic and XLA FLOP counts without running it (e.g. "
                  "a GPU config's counts, compiled on a CPU).")
flags.DEFINE_bool("xla_flops", True, "Also compile the step with its layers unrolled for XLA's FLOP count.")
flags.DEFINE_string("profile_dir", None, "Trace --profile_steps more steps into this folder and print the top ops.")
flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.")
FLAGS = flags.FLAGS

# Dense bf16 peak TFLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0, "TPU v5e": 197.0}
PRESET_ITEMS = {"tiny": 1_000, "small": 10_000, "medium": 100_000, "large": 1_000_000}


def model_flops_per_token(cfg: TransformerConfig, seq_len: int, output_rows: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters a token goes through (the output layer over the
    `output_rows` tokens the loss scores, the value head's projection and its one item score when the
    model has one; not the embedding lookup) + attention."""
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.mlp_dim
    value_head = d * d + d if cfg.value_head else 0
    matmul_params = cfg.num_layers * per_layer + output_rows * d + value_head
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


def device_op_times(trace_dir: str) -> list[tuple[str, float, int]]:
    """(op, total microseconds, count) of the operations that a jax.profiler trace in trace_dir (its Perfetto
    file) records on accelerator devices ('/device:' processes), largest total first; [] for a CPU trace,
    which records no device operations. An op is named by its HLO instruction where the trace gives one."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("ph") == "X" and event.get("pid") in devices:
            op = event.get("args", {}).get("hlo_op") or event["name"]
            totals[op][0] += float(event.get("dur", 0.0))
            totals[op][1] += 1
    return sorted(((op, total, count) for op, (total, count) in totals.items()), key=lambda r: -r[1])


def profile_steps(trainer: Trainer, state, batch, steps: int, trace_dir: str, top: int = 20):
    """Traces `steps` train steps into trace_dir and prints the `top` ops by accelerator time per step."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
    ops = device_op_times(trace_dir)
    if not ops:
        print(f"profile: the trace in {trace_dir} records no accelerator operations (a CPU run)")
        return state
    busy = sum(total for _, total, _ in ops)
    print(f"profile: {busy / steps / 1e3:,.1f} ms of device op time per step over {steps} traced steps "
          f"({len(ops)} distinct ops); the top {top}:")
    for op, total, count in ops[:top]:
        print(f"  {total / steps / 1e3:>9.2f} ms {total / busy:>6.1%} {count // steps:>4}x  {op[:110]}")
    return state


def main(argv):
    cfg = FLAGS.config
    items = FLAGS.items or PRESET_ITEMS.get(cfg.data.preset, 10_000)
    non_items = cfg.data.sentencepiece_vocab  # the text pieces; specials, context values and shelves add a few dozen
    vocab = non_items + items
    model_cfg = TransformerConfig(vocab_size=vocab, **cfg.model.to_dict())
    mesh = make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    sampled, output_rows = None, vocab
    if cfg.loss.kind == "sampled":
        counts = 1e6 / np.arange(1, items + 1)  # Zipf popularity, as catalogs have
        sampled = SampledSoftmax.create(non_items, counts, cfg.loss.num_negatives, cfg.loss.sampler)
        output_rows = non_items + cfg.loss.num_negatives + 1
    def make_trainer(model: TransformerConfig) -> Trainer:
        trainer = Trainer(model, cfg.train, mesh, [tuple(r) for r in cfg.rules], sampled, cfg.seed,
                          cfg.loss.value_weight, lora_config(cfg))
        if trainer.lora:  # adapters on freshly initialised parameters: the step's cost does not depend on them
            trainer.base = trainer.fresh_params()
        return trainer

    def xla_flops() -> float | None:
        # XLA's cost analysis counts a loop's body once, so the count comes from the same step with its layers
        # unrolled instead of scanned.
        counter = make_trainer(dataclasses.replace(model_cfg, scan_layers=False))
        return counter.step_flops(counter.init_state(), batch)

    trainer = make_trainer(model_cfg)
    state = trainer.init_state()
    b, t = cfg.train.batch_size, cfg.data.seq_len + 1
    rng = np.random.default_rng(0)
    token_ids = rng.integers(1, vocab, (b, t)).astype(np.int32)
    outcomes = np.where(token_ids >= non_items, rng.integers(1, 3, (b, t)), 0).astype(np.int32)  # skipped/streamed
    batch = trainer.global_batch({"tokens": token_ids, "weights": np.ones((b, t), np.float32), "outcomes": outcomes,
                                  "segment_ids": np.ones((b, t), np.int32),
                                  "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))})
    analytic = model_flops_per_token(model_cfg, cfg.data.seq_len, output_rows) * b * cfg.data.seq_len
    if FLAGS.flops_only:
        compiled = xla_flops()
        print(f"{'GFLOP per step':<24}{analytic / 1e9:>16,.1f}  (analytic count)")
        print(f"{'XLA GFLOP per step':<24}{compiled / 1e9:>16,.1f}  ({compiled / analytic:.2f}x the analytic count)")
        return
    first_loss = None
    for _ in range(3):
        state, metrics = trainer.train_step(state, batch)
        first_loss = float(metrics["loss"]) if first_loss is None else first_loss
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    step_time = (time.perf_counter() - start) / FLAGS.steps
    tokens = b * cfg.data.seq_len
    flops = analytic / step_time
    peak, source = device_peak_tflops(cfg.model.dtype)
    devices = jax.device_count()
    print(f"{'parameters':<24}{count_params(trainer.abstract_params):>16,}")
    if trainer.lora:
        print(f"{'trained (LoRA)':<24}{count_params(state['params']):>16,}  (rank {trainer.lora.rank})")
    print(f"{'devices':<24}{devices:>16} ({jax.devices()[0].device_kind})")
    print(f"{'batch x seq_len':<24}{f'{b} x {cfg.data.seq_len}':>16}")
    loss = (f"sampled softmax, {cfg.loss.num_negatives:,} negatives" if sampled else "full softmax")
    print(f"{'loss':<24}{loss:>16}" + (" + value head" if model_cfg.value_head else ""))
    print(f"{'vocabulary':<24}{vocab:>16,} ({items:,} items)")
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state["opt_state"]))
    print(f"{'optimizer state':<24}{state_bytes / 2**20:>12,.1f} MiB  (embedding: {cfg.train.embedding_optimizer})")
    attention = "cuDNN fused" if model_cfg.fused_attention and jax.default_backend() == "gpu" else "XLA"
    print(f"{'attention':<24}{attention:>16}")
    print(f"{'first-step loss':<24}{first_loss:>16.6f}  (seeded parameters and batch: equal settings give equal loss)")
    print(f"{'step time (ms)':<24}{step_time * 1e3:>16.1f}")
    print(f"{'tokens/s':<24}{tokens / step_time:>16,.0f}")
    print(f"{'model TFLOP/s':<24}{flops / 1e12:>16.3f}  (analytic count)")
    print(f"{'peak TFLOP/s/device':<24}{peak:>16.3f}  ({source})")
    print(f"{'MFU':<24}{flops / 1e12 / (peak * devices):>16.1%}  (analytic count)")
    if FLAGS.profile_dir:
        state = profile_steps(trainer, state, batch, FLAGS.profile_steps, FLAGS.profile_dir)
    compiled = xla_flops() if FLAGS.xla_flops else None
    if compiled is not None:  # what XLA says the compiled step computes: what ran, frozen weights included
        print(f"{'XLA TFLOP/s':<24}{compiled / step_time / 1e12:>16.3f}  (compiled step's cost analysis: "
              f"{compiled / (flops * step_time):.2f}x the analytic count)")
        print(f"{'MFU (XLA count)':<24}{compiled / step_time / 1e12 / (peak * devices):>16.1%}")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"{'peak device memory':<24}{stats['peak_bytes_in_use'] / 2**30:>16.2f} GiB")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)

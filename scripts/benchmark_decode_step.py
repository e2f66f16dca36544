"""Where a cached decoding step's time goes: the model's step over a KV cache, by beam rows and cache slots,
with and without the beam reorder (`KVCache.take`) that beam search does before every step.

    python scripts/benchmark_decode_step.py [--rows 4,32] [--slots 128,320] [--steps 60] [--d_model 256] \
        [--num_layers 4] [--num_heads 8] [--num_kv_heads 4] [--head_dim 32] [--mlp_dim 1024] [--vocab 2000]

The defaults are `configs/pages_small.py:semantic`'s model (the 10^6-item world's checkpoint) with random
weights. A 64-token prompt is prefilled, then --steps greedy steps run inside one jitted `fori_loop`, as beam
search runs them inside its `while_loop` (so XLA may update the cache in place). A page of 6 x 10 items with
4 codes each takes about 247 steps, and the prompt plus those steps need about 320 slots. Prints one row per
(rows, slots): milliseconds per step without and with the reorder.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from homegen.model.decoding import decode_step, prefill
from homegen.model.transformer import Transformer, TransformerConfig

PROMPT = 64


def step_ms(graphdef, params, rows: int, slots: int, steps: int, reorder: bool, repeats: int) -> float:
    """Milliseconds per cached decoding step of `rows` rows over a `slots`-slot cache (the fastest of `repeats`
    timed calls after a compiling one: the machine is shared, and the fastest call is the least disturbed)."""

    @jax.jit
    def decode(params, prompts):
        model = nnx.merge(graphdef, params)
        logits, cache = prefill(model, prompts, jnp.full((rows,), PROMPT), slots)
        parents = (jnp.arange(rows) + 1) % rows  # every row continues another row's beam

        def body(i, carry):
            cache, tokens = carry
            if reorder:
                cache = cache.take(parents)
            logits, cache = decode_step(model, tokens, jnp.full((rows,), PROMPT) + i, cache)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, jnp.argmax(logits, -1).astype(jnp.int32)))[1]

    prompts = jnp.ones((rows, PROMPT), jnp.int32)
    decode(params, prompts).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode(params, prompts).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times) / steps * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="4,32", help="beam rows (requests x beam size)")
    parser.add_argument("--slots", default="128,320", help="KV cache slots (at least 64 + --steps)")
    parser.add_argument("--steps", type=int, default=60)
    for name, default in (("d_model", 256), ("num_layers", 4), ("num_heads", 8), ("num_kv_heads", 4),
                          ("head_dim", 32), ("mlp_dim", 1024), ("vocab", 2000)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (the fastest is reported)")
    parser.add_argument("--unroll", action="store_true", help="unroll the layers (scan_layers=False)")
    args = parser.parse_args(argv)
    if min(map(int, args.slots.split(","))) < PROMPT + args.steps:
        parser.error(f"--slots must hold the {PROMPT}-token prompt and the --steps tokens: at least {PROMPT + args.steps}")
    cfg = TransformerConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.num_layers,
                            num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                            mlp_dim=args.mlp_dim, scan_layers=not args.unroll)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    print(f"model {cfg.num_params():,} parameters on {jax.devices()[0].device_kind}; {args.steps} steps per call")
    print(f"{'rows':>5} {'slots':>6} {'ms/step':>9} {'with reorder':>13}")
    for rows in map(int, args.rows.split(",")):
        for slots in map(int, args.slots.split(",")):
            plain, reordered = (step_ms(graphdef, params, rows, slots, args.steps, r, args.repeats) for r in (False, True))
            print(f"{rows:>5} {slots:>6} {plain:>9.2f} {reordered:>13.2f}", flush=True)


if __name__ == "__main__":
    main()

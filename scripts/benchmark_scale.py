"""How serving cost grows with the catalog: constrained beam search over 10^4 to 10^6 (or 10^7) items, with
atomic item tokens (one per item) or semantic IDs (3 levels of 256 codes and a collision code per item).

    python scripts/benchmark_scale.py [--items 10000,100000,1000000] [--item_tokens atomic,semantic]
        [--batches 1,16] [--beam 4] [--calls 20] [--train_steps 5] [--train_batch 8]

For each catalog size: a model of the demo's shapes with random weights (the shapes, not the weights, set
the cost), 30 shelf types whose static eligibility is a random 2-30% of the catalog each, two
history-dependent shelves (the request's 50 history items; a pool of 200 items), 10 exclusions per request,
and pages of exactly 6 shelves x 10 items, decoded as serving decodes them (`beam_search` with the static
mask on the device and each request's index lists). Prints per catalog: parameter and static-mask bytes,
the host bytes a request sends (its index lists) beside the dense (shelves x items) mask it would
otherwise need, p50/p99 latency and pages/s at each batch size, and the peak RSS so far; then the train
step's tokens/s and pages/s and the checkpoint size (`measure_training`).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from homegen.configs.demo import get_config
from homegen.data.semantic_ids import SemanticItems, with_collision_code
from homegen.model.decoding import beam_search
from homegen.model.grammar import PageGrammar
from homegen.model.loss import SampledSoftmax
from homegen.model.sharding import make_mesh
from homegen.model.transformer import Transformer, TransformerConfig
from homegen.serving.engine import stack_rules
from homegen.training.state import Trainer, count_params

SHELVES, DYNAMIC, NON_ITEM_TOKENS = 30, 2, 300
PAGE_SHELVES, PAGE_ITEMS, HISTORY, POOL, EXCLUDED, PROMPT = 6, 10, 50, 200, 10, 64


def request_rules(rng: np.random.Generator, items: int) -> dict[str, np.ndarray]:
    """One request's rules as the engine builds them: the history-dependent pairs and exclusions."""
    history = rng.choice(items, HISTORY, replace=False).astype(np.int32)
    pool = rng.choice(items, POOL, replace=False).astype(np.int32)
    return {"extra_items": np.concatenate([history, pool]),
            "extra_shelves": np.repeat(np.arange(DYNAMIC, dtype=np.int32), [HISTORY, POOL]),
            "excluded": np.sort(rng.choice(items, EXCLUDED, replace=False)).astype(np.int32),
            "allowed_shelves": np.ones(SHELVES, bool), "min_items": np.int32(PAGE_ITEMS),
            "max_items": np.int32(PAGE_ITEMS), "max_shelves": np.int32(PAGE_SHELVES)}


def semantic_codes(rng: np.random.Generator, items: int) -> SemanticItems:
    """Random semantic IDs of the default shape: 3 levels of 256 codes and a collision code."""
    return SemanticItems([str(k) for k in range(items)], with_collision_code(rng.integers(0, 256, (items, 3))))


def measure(items: int, item_tokens: str, batches: list[int], beam: int, calls: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shelf_offset = NON_ITEM_TOKENS - SHELVES
    semantic = semantic_codes(rng, items) if item_tokens == "semantic" else None
    tokens = semantic.num_tokens if semantic else items
    grammar = PageGrammar(vocab_size=NON_ITEM_TOKENS + tokens, shelf_offset=shelf_offset, num_shelves=SHELVES,
                          item_offset=NON_ITEM_TOKENS, num_items=items,
                          level_sizes=tuple(semantic.level_sizes) if semantic else ())
    model_cfg = TransformerConfig(vocab_size=grammar.vocab_size, **{**get_config().model.to_dict(), "value_head": False})
    graphdef, state = nnx.split(Transformer(model_cfg, nnx.Rngs(seed)))
    params = nnx.to_pure_dict(state)
    density = rng.uniform(0.02, 0.3, SHELVES)[:, None]
    static = rng.random((SHELVES, items), dtype=np.float32) < density
    static[:DYNAMIC] = False  # the history-dependent shelves hold only their request's pairs
    shelf_items = grammar.tables(static, semantic.code_table() if semantic else None)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    one = request_rules(rng, items)
    request_bytes = sum(np.asarray(v).nbytes for v in one.values())
    print(f"\n{items:,} items, {item_tokens} ({grammar.levels} token(s) per item, {tokens:,} item tokens): "
          f"{param_bytes / 2**20:,.1f} MiB of parameters, static mask and codes "
          f"{(static.nbytes + shelf_items.codes.nbytes) / 2**20:,.1f} MiB on the device once; per request {request_bytes:,} bytes of index lists and flags "
          f"(a dense mask would be {SHELVES * items:,} bytes)")
    max_new = grammar.max_length(PAGE_SHELVES, PAGE_ITEMS)
    for batch in batches:
        latencies = []
        for call in range(calls + 1):  # the first call compiles and is not timed
            rules = stack_rules([request_rules(rng, items) for _ in range(batch)], batch)
            prompts = jnp.asarray(rng.integers(5, shelf_offset, (batch, PROMPT)), jnp.int32)
            lengths = jnp.full((batch,), PROMPT, jnp.int32)
            start = time.perf_counter()
            out = beam_search(graphdef, params, prompts, lengths, rules, shelf_items, grammar=grammar,
                              beam_size=beam, max_new=max_new)
            valid = np.asarray(out.valid[:, 0])
            if call:
                latencies.append(time.perf_counter() - start)
            if not valid.all():
                raise RuntimeError("a request got no valid page")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"  batch {batch:>3}, beam {beam}: p50 {np.percentile(latencies, 50) * 1e3:,.0f} ms, "
              f"p99 {np.percentile(latencies, 99) * 1e3:,.0f} ms, {batch * calls / sum(latencies):,.2f} pages/s "
              f"({calls} calls); peak RSS so far {peak:,.2f} GiB", flush=True)


def measure_training(items: int, item_tokens: str, batch: int, steps: int, seed: int = 0) -> None:
    """Train-step throughput of the demo-shaped model at this catalog size (random batches of pages as long
    as a 6 x 10 page with 30 history items is in these tokens; atomic with sampled softmax over 1,024
    negatives, semantic with the full softmax over its small vocabulary) and the checkpoint's size
    (parameters + Adam moments, float32)."""
    rng = np.random.default_rng(seed)
    cfg = get_config()
    levels = 4 if item_tokens == "semantic" else 1
    item_vocab = 3 * 256 + 8 if item_tokens == "semantic" else items
    seq_len = PROMPT + PAGE_SHELVES * (PAGE_ITEMS * levels + 1) + 30 * levels
    model_cfg = TransformerConfig(vocab_size=NON_ITEM_TOKENS + item_vocab, **{**cfg.model.to_dict(), "value_head": False})
    sampled = None
    if item_tokens == "atomic":
        sampled = SampledSoftmax.create(NON_ITEM_TOKENS, 1e6 / np.arange(1, items + 1), 1024, "popularity")
    trainer = Trainer(model_cfg, cfg.train, make_mesh((-1, 1, 1)), [tuple(r) for r in cfg.rules], sampled, seed)
    state = trainer.init_state()
    tokens = rng.integers(1, model_cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    data = trainer.global_batch({"tokens": tokens, "weights": np.ones(tokens.shape, np.float32),
                                 "outcomes": np.zeros(tokens.shape, np.int32),
                                 "segment_ids": np.ones(tokens.shape, np.int32),
                                 "positions": np.tile(np.arange(seq_len + 1, dtype=np.int32), (batch, 1))})
    for _ in range(2):
        state, metrics = trainer.train_step(state, data)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.train_step(state, data)
    jax.block_until_ready(metrics)
    step_time = (time.perf_counter() - start) / steps
    checkpoint = sum(x.nbytes for x in jax.tree.leaves(state["params"])) * 3  # parameters and two Adam moments
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  training: {count_params(state['params']):,} parameters, batch {batch} x {seq_len} tokens: "
          f"{step_time * 1e3:,.0f} ms/step, {batch * seq_len / step_time:,.0f} tokens/s, {batch / step_time:,.1f} "
          f"pages/s; checkpoint {checkpoint / 2**20:,.1f} MiB; peak RSS so far {peak:,.2f} GiB", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="10000,100000,1000000", help="comma-separated catalog sizes")
    parser.add_argument("--item_tokens", default="atomic,semantic", help="atomic, semantic or both")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per figure")
    parser.add_argument("--train_steps", type=int, default=5, help="timed training steps (0: no training figures)")
    parser.add_argument("--train_batch", type=int, default=8)
    args = parser.parse_args(argv)
    print(f"demo-shaped model, random weights; {SHELVES} shelf types; pages of exactly {PAGE_SHELVES} x "
          f"{PAGE_ITEMS} items; {jax.devices()[0].device_kind}")
    for items in (int(n) for n in args.items.split(",")):
        for item_tokens in args.item_tokens.split(","):
            measure(items, item_tokens, [int(b) for b in args.batches.split(",")], args.beam, args.calls)
            if args.train_steps:
                measure_training(items, item_tokens, args.train_batch, args.train_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

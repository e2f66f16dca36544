"""How serving cost grows with the catalog: constrained beam search over 10^4 to 7 x 10^7 items, with
atomic item tokens (one per item) or semantic IDs (3 levels of 256 codes and a collision code per item).

    python scripts/benchmark_scale.py [--items 10000,100000,1000000,70000000] [--item_tokens atomic,semantic]
        [--batches 1,16] [--beam 4] [--calls 20] [--train_steps 5] [--train_batch 8]
    python scripts/benchmark_scale.py --checkpoint RUN --requests REQUESTS.jsonl   # real requests' bytes

For each catalog size: a model of the demo's shapes with random weights (the shapes, not the weights, set
the cost), 30 shelf types whose static eligibility is a random 2-30% of the catalog each, two
history-dependent shelves (the request's 50 history items; a pool of 200 items), 10 exclusions per request,
and pages of exactly 6 shelves x 10 items, decoded as serving decodes them (`beam_search` with the
decoding tables on the device and each request's index lists). Every decoded page is checked against the
dense eligibility, the request's lists and the code table. Prints per catalog: parameter and table bytes
(and bytes per item), the host bytes a request sends (its index lists) beside the dense (shelves x items)
mask it would otherwise need, p50/p99 latency and pages/s at each batch size, and the peak RSS so far;
then the train step's tokens/s and pages/s and the checkpoint size (`measure_training`); at the end each
size's p50 against the smallest catalog's in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from homegen.configs.demo import get_config
from homegen.data.vocab import EOS
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


def semantic_code_table(rng: np.random.Generator, items: int) -> np.ndarray:
    """(items, 4) int16 random semantic IDs of the default shape, rows in code-tuple order: 3 levels of 256
    codes and a collision code numbering the items that share the first three (streamed through one sort,
    so that 7 x 10^7 items fit in memory)."""
    key = np.sort(rng.integers(0, 1 << 24, items, dtype=np.int32))
    starts = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    rank = np.arange(items, dtype=np.int32) - np.repeat(starts, np.diff(np.r_[starts, items])).astype(np.int32)
    return np.stack([key >> 16, (key >> 8) & 255, key & 255, rank], axis=1).astype(np.int16)


def static_eligibility(rng: np.random.Generator, items: int) -> np.ndarray:
    """(SHELVES, items) bool: each static shelf admits a random 2-30% of the catalog; the history-dependent
    shelves admit nothing for every request (one row at a time, to stay small at 7 x 10^7 items)."""
    static = np.zeros((SHELVES, items), bool)
    for shelf, density in enumerate(rng.uniform(0.02, 0.3, SHELVES)):
        if shelf >= DYNAMIC:
            static[shelf] = rng.random(items, dtype=np.float32) < density
    return static


def page_problems(tokens: np.ndarray, rules: dict[str, np.ndarray], static: np.ndarray, grammar: PageGrammar,
                  item_keys: np.ndarray | None) -> list[str]:
    """The rules a decoded page (tokens) breaks, judged from the dense eligibility and the code table alone
    (not from the decoder's tables): shelf count and repeats, items per shelf, eligibility (static or the
    request's pairs), exclusions, repeated items. `item_keys`: each item's code tuple as one sorted int64."""
    extra = set(zip(rules["extra_shelves"].tolist(), rules["extra_items"].tolist()))
    excluded, placed, problems = set(rules["excluded"].tolist()), [], []
    shelves, codes = [], []
    for token in tokens.tolist():
        if token == EOS:
            break
        if grammar.shelf_offset <= token < grammar.shelf_offset + grammar.num_shelves:
            shelves.append((token - grammar.shelf_offset, []))
            continue
        codes.append(token - grammar.item_offset - grammar.level_offsets[len(codes)])
        if len(codes) < grammar.levels:
            continue
        if item_keys is None:
            item = codes[0]
        else:
            key = _tuple_key(np.array([codes]))[0]
            item = int(np.searchsorted(item_keys, key))
            if item >= len(item_keys) or item_keys[item] != key:
                problems.append(f"codes {codes} are no item")
        shelves[-1][1].append(item)
        codes = []
    if len(shelves) != PAGE_SHELVES or len({s for s, _ in shelves}) != len(shelves):
        problems.append(f"shelves {[s for s, _ in shelves]}")
    for shelf, shelf_items in shelves:
        if len(shelf_items) != PAGE_ITEMS:
            problems.append(f"shelf {shelf} has {len(shelf_items)} items")
        problems += [f"item {k} not eligible for shelf {shelf}" for k in shelf_items
                     if not static[shelf, k] and (shelf, k) not in extra]
        problems += [f"excluded item {k}" for k in shelf_items if k in excluded]
        placed += shelf_items
    if len(set(placed)) != len(placed):
        problems.append("an item twice")
    return problems


def _tuple_key(codes: np.ndarray) -> np.ndarray:
    """Code tuples (rows, 4) as one int64 each, in code-tuple order."""
    codes = codes.astype(np.int64)
    return ((codes[:, 0] * 256 + codes[:, 1]) * 256 + codes[:, 2]) * 65536 + codes[:, 3]


def measure(items: int, item_tokens: str, batches: list[int], beam: int, calls: int, item_width: int = 1,
            seed: int = 0) -> dict:
    """Prints, and returns as {batch: p50 seconds}, the decoding latency of one catalog size (`item_width`:
    beam search's hypotheses per beam inside a semantic ID's codes; 1 for atomic items)."""
    rng = np.random.default_rng(seed)
    shelf_offset = NON_ITEM_TOKENS - SHELVES
    codes = semantic_code_table(rng, items) if item_tokens == "semantic" else None
    level_sizes = tuple(int(m) + 1 for m in codes.max(axis=0)) if codes is not None else ()
    tokens = sum(level_sizes) if codes is not None else items
    grammar = PageGrammar(vocab_size=NON_ITEM_TOKENS + tokens, shelf_offset=shelf_offset, num_shelves=SHELVES,
                          item_offset=NON_ITEM_TOKENS, num_items=items, level_sizes=level_sizes)
    model_cfg = TransformerConfig(vocab_size=grammar.vocab_size, **{**get_config().model.to_dict(), "value_head": False})
    graphdef, state = nnx.split(Transformer(model_cfg, nnx.Rngs(seed)))
    params = nnx.to_pure_dict(state)
    static = static_eligibility(rng, items)
    start = time.perf_counter()
    tables = grammar.tables(static, codes)
    jax.block_until_ready(tables)
    build_s = time.perf_counter() - start
    item_keys = _tuple_key(codes) if codes is not None else None
    del codes
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    one = request_rules(rng, items)
    request_bytes = sum(np.asarray(v).nbytes for v in one.values())
    print(f"\n{items:,} items, {item_tokens} ({grammar.levels} token(s) per item, {tokens:,} item tokens): "
          f"{param_bytes / 2**20:,.1f} MiB of parameters; decoding tables {tables.nbytes() / 2**20:,.1f} MiB on the "
          f"device once ({tables.nbytes() / items:.1f} bytes per item, built in {build_s:.1f} s); per request "
          f"{request_bytes:,} bytes of index lists and flags (a dense mask would be {SHELVES * items:,} bytes)")
    max_new = grammar.max_length(PAGE_SHELVES, PAGE_ITEMS)
    p50 = {}
    for batch in batches:
        latencies, checked = [], 0
        for call in range(calls + 1):  # the first call compiles and is not timed
            requests = [request_rules(rng, items) for _ in range(batch)]
            rules = stack_rules(requests, batch)
            prompts = jnp.asarray(rng.integers(5, shelf_offset, (batch, PROMPT)), jnp.int32)
            lengths = jnp.full((batch,), PROMPT, jnp.int32)
            start = time.perf_counter()
            out = beam_search(graphdef, params, prompts, lengths, rules, tables, grammar=grammar,
                              beam_size=beam, max_new=max_new, item_width=item_width)
            valid = np.asarray(out.valid[:, 0])
            if call:
                latencies.append(time.perf_counter() - start)
            if not valid.all():
                raise RuntimeError("a request got no valid page")
            pages = np.asarray(out.tokens[:, 0])
            for request, page in zip(requests, pages):
                problems = page_problems(page, request, static, grammar, item_keys)
                if problems:
                    raise RuntimeError(f"an invalid page: {problems[:5]}")
                checked += 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        p50[batch] = float(np.percentile(latencies, 50))
        width = f", item width {item_width}" if grammar.levels > 1 else ""
        print(f"  batch {batch:>3}, beam {beam}{width}: p50 {p50[batch] * 1e3:,.0f} ms, "
              f"p99 {np.percentile(latencies, 99) * 1e3:,.0f} ms, {batch * calls / sum(latencies):,.2f} pages/s "
              f"({calls} calls); {checked} pages, all valid; peak RSS so far {peak:,.2f} GiB", flush=True)
    return p50


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


def request_bytes_formula(pairs: int, excluded: int, familiar: int, shelves: int) -> int:
    """What a request's rules take: int32 item and shelf per history-dependent pair, int32 per exclusion,
    int32 per item its `familiarity` raises (none at 0), a byte per shelf type (allowed or not), three int32
    limits and the float32 familiarity."""
    return 8 * pairs + 4 * excluded + 4 * familiar + shelves + 16


def measure_request_bytes(checkpoint: str, requests_path: str) -> None:
    """Prints the bytes of the rules each request of `requests_path` (FORMATS.md §4 lines) really sends to the
    decoder on `checkpoint`: its history-dependent pairs (from its real history), exclusions and flags."""
    from homegen.serving.engine import PageEngine
    from homegen.serving.requests import parse_request

    engine = PageEngine(checkpoint)
    sizes, pairs, excluded, familiar = [], [], [], []
    with open(requests_path) as f:
        for line in f:
            rules = engine.request_rules(parse_request(json.loads(line)).with_session())
            sizes.append(sum(np.asarray(v).nbytes for v in rules.values()))
            pairs.append(len(rules["extra_items"]))
            excluded.append(len(rules["excluded"]))
            familiar.append(len(rules["boosted"]))
    shelves = len(engine.shelf_types)
    assert all(size == request_bytes_formula(p, e, f, shelves)
               for size, p, e, f in zip(sizes, pairs, excluded, familiar))
    print(f"{len(sizes)} requests of {requests_path} on {checkpoint} ({shelves} shelf types): bytes of rules = "
          f"8 x pairs + 4 x exclusions + 4 x familiar items + {shelves} + 16, whatever the catalog's size")
    for name, values in (("history-dependent pairs", pairs), ("exclusions", excluded), ("bytes", sizes)):
        print(f"  {name:<24} mean {np.mean(values):,.1f}, p50 {np.percentile(values, 50):,.0f}, "
              f"p99 {np.percentile(values, 99):,.0f}, max {max(values):,}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="10000,100000,1000000", help="comma-separated catalog sizes")
    parser.add_argument("--item_tokens", default="atomic,semantic", help="atomic, semantic or both")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--item_width", default="1",
                        help="semantic rows: comma-separated item widths of beam search (hypotheses per beam inside "
                             "an item), each measured and compared with the first")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per figure")
    parser.add_argument("--train_steps", type=int, default=5, help="timed training steps (0: no training figures)")
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--checkpoint", default=None, help="with --requests: measure real requests' bytes and exit")
    parser.add_argument("--requests", default=None, help="FORMATS.md §4 requests (JSON Lines) for --checkpoint")
    args = parser.parse_args(argv)
    if args.checkpoint or args.requests:
        if not (args.checkpoint and args.requests):
            parser.error("--checkpoint and --requests go together")
        measure_request_bytes(args.checkpoint, args.requests)
        return 0
    print(f"demo-shaped model, random weights; {SHELVES} shelf types; pages of exactly {PAGE_SHELVES} x "
          f"{PAGE_ITEMS} items; {jax.devices()[0].device_kind}")
    batches = [int(b) for b in args.batches.split(",")]
    widths = [int(w) for w in args.item_width.split(",")]
    p50: dict[tuple[str, int, int], dict[int, float]] = {}
    for items in (int(n) for n in args.items.split(",")):
        for item_tokens in args.item_tokens.split(","):
            for width in widths if item_tokens == "semantic" else [1]:
                p50[item_tokens, items, width] = measure(items, item_tokens, batches, args.beam, args.calls, width)
            if args.train_steps:
                measure_training(items, item_tokens, args.train_batch, args.train_steps)
    print("\np50 latency against the smallest catalog of the same item tokens and item width, and against the "
          "first item width (this run):")
    for (item_tokens, items, width), by_batch in p50.items():
        smallest = p50[item_tokens, min(n for t, n, w in p50 if t == item_tokens and w == width), width]
        narrow = p50[item_tokens, items, widths[0] if item_tokens == "semantic" else 1]
        ratios = ", ".join(f"batch {b}: {by_batch[b] / smallest[b]:.2f}x, {by_batch[b] / narrow[b]:.2f}x"
                           for b in batches)
        print(f"  {item_tokens:<8} {items:>12,} items, width {width}: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving speed: pages/s and p50/p99 latency of constrained beam search (likelihood objective), at batch 1
and batched, for beam sizes 1/4/8, side by side in one run with (a) our decoding without the KV cache,
(b) Hugging Face `transformers` generate() (num_beams, prefix_allowed_tokens_fn enforcing the same page
grammar) on a GPT-2 model of the same size, on the CPU build of torch, and (c) on a checkpoint with a
value head, our beam search with the streams objective.

    python scripts/benchmark_serve.py --checkpoint RUN [--requests 16] [--beams 1,4,8] [--batch 8]

(b) needs `pip install torch==2.13.0 transformers` (the `bench` extra); it is skipped when absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data.vocab import EOS, PAD  # noqa: E402
from serving.engine import PageEngine  # noqa: E402
from serving.requests import parse_request  # noqa: E402


def make_requests(engine: PageEngine, count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = engine.vocab.items.item_ids
    return [{"user_id": f"u{k}", "history": [items[i] for i in rng.choice(len(items), 10, replace=False)],
             "context": {"hour": int(rng.integers(24)), "device": "mobile"}, "num_shelves": 6,
             "min_items_per_shelf": 4, "max_items_per_shelf": 10} for k in range(count)]


def time_ours(engine: PageEngine, requests: list[dict], beam: int, batch: int) -> list[float]:
    """Latency of each call; every call serves `batch` requests."""
    parsed = [parse_request({**r, "beam_size": beam}) for r in requests]
    engine.generate(parsed[:batch])  # compile
    latencies = []
    for start in range(0, len(parsed), batch):
        t = time.perf_counter()
        engine.generate(parsed[start:start + batch])
        latencies.append(time.perf_counter() - t)
    return latencies


class GrammarForHF:
    """The page grammar as a prefix_allowed_tokens_fn, on the host (what a transformers user would write)."""

    def __init__(self, engine: PageEngine, requests: list[dict], prompt_width: int):
        v = engine.vocab
        self.v, self.width = v, prompt_width
        self.eligible = [engine.eligibility.matrix(r["history"]) for r in requests]
        self.requests = requests

    def __call__(self, batch_id: int, input_ids) -> list[int]:
        v, r = self.v, self.requests[batch_id]
        generated = input_ids[self.width:].tolist()
        shelves, items, current, used_items, used_shelves = 0, 0, -1, set(), set()
        for t in generated:
            if t == EOS:
                return [PAD]
            if v.is_shelf(t):
                shelves, items, current = shelves + 1, 0, t - v.shelf_offset
                used_shelves.add(current)
            elif v.is_item(t):
                items += 1
                used_items.add(t - v.item_offset)
        eligible = self.eligible[batch_id]
        available = np.ones(v.items.num_tokens, bool)
        available[list(used_items)] = False
        enough = (eligible & available).sum(axis=1) >= r["min_items_per_shelf"]
        startable = [s for s in range(len(v.shelves)) if enough[s] and s not in used_shelves]
        allowed = []
        if current >= 0 and items < r["max_items_per_shelf"]:
            allowed += [v.item_offset + int(i) for i in np.flatnonzero(eligible[current] & available)]
        can_close = current >= 0 and items >= r["min_items_per_shelf"]
        more = shelves < r["num_shelves"] and bool(startable)
        if (shelves == 0 or can_close) and shelves < r["num_shelves"]:
            allowed += [v.shelf_offset + s for s in startable]
        if can_close and not more:
            allowed.append(EOS)
        return allowed


def time_hf(engine: PageEngine, requests: list[dict], beam: int, batch: int) -> list[float] | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    cfg = engine.model_cfg
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=engine.vocab.size, n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_inner=cfg.mlp_dim, n_positions=512, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)).eval()
    max_new = engine.grammar.max_length(6, 10)
    latencies = []
    for start in [0] + list(range(0, len(requests), batch)):  # the first pass warms up and is not timed
        chunk = requests[start:start + batch]
        prompts = [engine.vocab.encode_prompt({k: str(x) for k, x in r["context"].items()}, None, r["history"]) for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        grammar = GrammarForHF(engine, chunk, width)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, num_beams=beam, do_sample=False,
                           max_new_tokens=max_new, prefix_allowed_tokens_fn=grammar, pad_token_id=PAD,
                           eos_token_id=EOS)
        latencies.append(time.perf_counter() - t)
    return latencies[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--beams", default="1,4,8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip", default="", help="comma-separated: nocache,hf")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    engine = PageEngine(args.checkpoint, objective="likelihood")
    no_cache = PageEngine(args.checkpoint, use_cache=False, objective="likelihood")
    streams = PageEngine(args.checkpoint, objective="streams") if engine.model_cfg.value_head else None
    requests = make_requests(engine, args.requests)
    skip = set(args.skip.split(","))
    print(f"model {engine.model_cfg.num_params():,} parameters, vocabulary {engine.vocab.size:,}, pages of 6 shelves x "
          f"4-10 items, {args.requests} requests")
    print(f"{'system':<28}{'beam':>5}{'batch':>6}{'pages/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    results = {}
    for beam in [int(b) for b in args.beams.split(",")]:
        for batch in (1, args.batch):
            systems = [("homegen (KV cache)", lambda: time_ours(engine, requests, beam, batch))]
            if "nocache" not in skip:
                systems.append(("homegen without KV cache", lambda: time_ours(no_cache, requests, beam, batch)))
            if streams is not None:
                systems.append(("homegen, streams objective", lambda: time_ours(streams, requests, beam, batch)))
            if "hf" not in skip:
                systems.append(("transformers generate()", lambda: time_hf(engine, requests, beam, batch)))
            for name, timer in systems:
                latencies = timer()
                if latencies is None:
                    print(f"{name:<28}{beam:>5}{batch:>6}   (torch/transformers not installed)")
                    continue
                pages_per_s = len(requests) / sum(latencies)
                results[(name, beam, batch)] = pages_per_s
                p50, p99 = np.percentile(latencies, 50) * 1e3, np.percentile(latencies, 99) * 1e3
                print(f"{name:<28}{beam:>5}{batch:>6}{pages_per_s:>10.2f}{p50:>10.0f}{p99:>10.0f}", flush=True)
            ours = results.get(("homegen (KV cache)", beam, batch))
            hf = results.get(("transformers generate()", beam, batch))
            if ours and hf:
                print(f"{'  speed-up over transformers':<39}{ours / hf:>10.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

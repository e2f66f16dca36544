"""Serving speed at equal work: pages/s, tokens/s and p50/p99 latency of constrained beam search (likelihood
objective) at batch 1 and batched, for beam sizes 1/4/8, side by side in one run with (a) our decoding
without the KV cache, (b) Hugging Face `transformers` generate() on a GPT-2 model of the same size (CPU
build of torch) with the same page grammar enforced two ways: a per-row `prefix_allowed_tokens_fn` on the
host (what a transformers user would write first) and a vectorised `LogitsProcessor` that builds the
grammar mask for all rows at once with torch ops (the fairer opponent), and (c) on a checkpoint with a
value head, our beam search with the streams objective.

Every page has exactly `--shelves` shelves of exactly `--items` items (min = max items per shelf), so each
system decodes the same number of tokens per page; the table reports it. Each latency figure comes from
`--calls` timed calls, cycling over `--requests` distinct requests, after an untimed pass over all of them
(homegen compiles once per bucket of index-list lengths: the figures are for a warm server).

    python scripts/benchmark_serve.py --checkpoint RUN [--calls 100] [--beams 1,4,8] [--batch 8]

(b) needs `pip install torch==2.13.0 transformers` (the `bench` extra); it is skipped when absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

import numpy as np

from homegen.data.vocab import EOS, PAD
from homegen.serving.engine import PageEngine
from homegen.serving.requests import parse_request


def make_requests(engine: PageEngine, count: int, shelves: int, items: int, seed: int = 0) -> list[dict]:
    """`count` requests for pages of exactly `shelves` x `items` (min = max items per shelf)."""
    rng = np.random.default_rng(seed)
    ids = engine.item_ids
    return [{"user_id": f"u{k}", "history": [ids[i] for i in rng.choice(len(ids), 10, replace=False)],
             "context": {"hour": int(rng.integers(24)), "device": "mobile"}, "num_shelves": shelves,
             "min_items_per_shelf": items, "max_items_per_shelf": items} for k in range(count)]


def chunks(requests: list, batch: int, calls: int) -> list[list]:
    """`calls` batches of `batch` requests, cycling over `requests`."""
    return [[requests[(c * batch + j) % len(requests)] for j in range(batch)] for c in range(calls)]


@dataclasses.dataclass
class Timing:
    latencies: list[float]  # seconds per call
    tokens: list[int]  # generated tokens of each page served (EOS included)

    def row(self) -> dict[str, float]:
        pages = len(self.tokens)
        return {"calls": len(self.latencies), "tokens/page": float(np.mean(self.tokens)),
                "pages/s": pages / sum(self.latencies), "tokens/s": sum(self.tokens) / sum(self.latencies),
                "p50 ms": float(np.percentile(self.latencies, 50) * 1e3),
                "p99 ms": float(np.percentile(self.latencies, 99) * 1e3)}


def time_ours(engine: PageEngine, requests: list[dict], beam: int, batch: int, calls: int) -> Timing:
    parsed = [parse_request({**r, "beam_size": beam}) for r in requests]
    for chunk in chunks(parsed, batch, -(-len(parsed) // batch)):  # compile every shape the requests need
        engine.generate(chunk)
    timing = Timing([], [])
    for chunk in chunks(parsed, batch, calls):
        t = time.perf_counter()
        responses = engine.generate(chunk)
        timing.latencies.append(time.perf_counter() - t)
        if any("error" in r for r in responses):
            raise RuntimeError(f"a benchmark request failed: {responses}")
        timing.tokens += [len(engine.page_tokens(r["page"])) for r in responses]
    return timing


class GrammarForHF:
    """The page grammar as a prefix_allowed_tokens_fn, on the host (what a transformers user would write)."""

    def __init__(self, engine: PageEngine, requests: list[dict], prompt_width: int):
        v = engine.vocab
        self.v, self.width = v, prompt_width
        self.eligible = [engine.eligible(r["history"]) for r in requests]
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


def grammar_logits_processor(engine: PageEngine, requests: list[dict], prompt_width: int, beams: int):
    """The page grammar as a transformers LogitsProcessor: the state of every row (request x beam) is read
    off its generated tokens and the mask is built for all rows at once with torch ops."""
    import torch
    import transformers

    v = engine.vocab
    eligible = torch.as_tensor(np.stack([engine.eligible(r["history"]) for r in requests]))
    eligible = eligible.repeat_interleave(beams, dim=0)  # (R, S, N)
    min_items = torch.tensor([r["min_items_per_shelf"] for r in requests]).repeat_interleave(beams)
    max_items = torch.tensor([r["max_items_per_shelf"] for r in requests]).repeat_interleave(beams)
    max_shelves = torch.tensor([r["num_shelves"] for r in requests]).repeat_interleave(beams)
    num_shelves, num_items = len(v.shelves), v.items.num_tokens

    class GrammarProcessor(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            generated = input_ids[:, prompt_width:]
            if generated.shape[1] == 0:  # nothing yet: one PAD column reads as the empty page
                generated = torch.full((input_ids.shape[0], 1), PAD)
            rows = generated.shape[0]
            shelf = generated - v.shelf_offset
            item = generated - v.item_offset
            is_shelf = (shelf >= 0) & (shelf < num_shelves)
            is_item = (item >= 0) & (item < num_items)
            used_items = torch.zeros(rows, num_items + 1, dtype=torch.bool)
            used_items.scatter_(1, torch.where(is_item, item, num_items), True)
            used_shelves = torch.zeros(rows, num_shelves + 1, dtype=torch.bool)
            used_shelves.scatter_(1, torch.where(is_shelf, shelf, num_shelves), True)
            used_items, used_shelves = used_items[:, :num_items], used_shelves[:, :num_shelves]
            shelves = is_shelf.sum(1)
            position = torch.arange(generated.shape[1]).expand_as(generated)
            last_shelf_at = torch.where(is_shelf, position, -1).max(1).values
            current = torch.where(last_shelf_at >= 0, shelf.gather(1, last_shelf_at.clamp(min=0)[:, None])[:, 0], -1)
            items = (is_item & (position > last_shelf_at[:, None])).sum(1)
            done = (generated == EOS).any(1)
            available = ~used_items
            in_shelf = current >= 0
            on_shelf = eligible[torch.arange(rows), current.clamp(min=0)]
            item_ok = (in_shelf & (items < max_items))[:, None] & on_shelf & available
            enough = (eligible & available[:, None, :]).sum(-1) >= min_items[:, None]
            startable = ~used_shelves & enough
            can_close = in_shelf & (items >= min_items)
            more = (shelves < max_shelves) & startable.any(1)
            shelf_ok = (((shelves == 0) | can_close) & (shelves < max_shelves))[:, None] & startable
            eos_ok = can_close & ~more
            allowed = torch.zeros_like(scores, dtype=torch.bool)
            allowed[:, v.shelf_offset:v.shelf_offset + num_shelves] = shelf_ok & ~done[:, None]
            allowed[:, v.item_offset:v.item_offset + num_items] = item_ok & ~done[:, None]
            allowed[:, EOS] = eos_ok & ~done
            allowed[:, PAD] = done
            return scores.masked_fill(~allowed, -float("inf"))

    return transformers.LogitsProcessorList([GrammarProcessor()])


def time_hf(engine: PageEngine, requests: list[dict], beam: int, batch: int, calls: int,
            vectorised: bool) -> Timing | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    cfg = engine.model_cfg
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=engine.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_inner=cfg.mlp_dim, n_positions=512, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)).eval()
    r = requests[0]
    max_new = engine.max_page_tokens(r["num_shelves"], r["max_items_per_shelf"])
    timing = Timing([], [])
    for call, chunk in enumerate(chunks(requests, batch, calls + 1)):  # the first call warms up, untimed
        prompts = [engine.prompt(parse_request(r)) for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        constraint = ({"logits_processor": grammar_logits_processor(engine, chunk, width, beam)} if vectorised
                      else {"prefix_allowed_tokens_fn": GrammarForHF(engine, chunk, width)})
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, num_beams=beam, do_sample=False,
                                 max_new_tokens=max_new, pad_token_id=PAD, eos_token_id=EOS, **constraint)
        elapsed = time.perf_counter() - t
        if call:
            timing.latencies.append(elapsed)
            for row in out[:, width:].tolist():
                timing.tokens.append(row.index(EOS) + 1 if EOS in row else len(row))
    return timing


COLUMNS = ("calls", "tokens/page", "pages/s", "tokens/s", "p50 ms", "p99 ms")
HF_SYSTEMS = ("transformers, host grammar fn", "transformers, vectorised processor")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--calls", type=int, default=100, help="timed calls per latency figure")
    parser.add_argument("--requests", type=int, default=64, help="distinct requests the calls cycle over")
    parser.add_argument("--shelves", type=int, default=6)
    parser.add_argument("--items", type=int, default=10, help="items per shelf (min = max)")
    parser.add_argument("--beams", default="1,4,8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip", default="", help="comma-separated: nocache,streams,hf_host,hf_vectorised")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    engine = PageEngine(args.checkpoint, objective="likelihood")
    skip = set(args.skip.split(","))
    if engine.semantic_ids and not {"hf_host", "hf_vectorised"} <= skip:
        print(f"{args.checkpoint} uses semantic item IDs; the transformers baselines mask one token per item: "
              "pass --skip hf_host,hf_vectorised", file=sys.stderr)
        return 2
    requests = make_requests(engine, args.requests, args.shelves, args.items)
    print(f"model {engine.model_cfg.num_params():,} parameters, vocabulary {engine.vocab_size:,}; pages of exactly "
          f"{args.shelves} shelves x {args.items} items; {args.calls} timed calls per row")
    print(f"{'system':<38}{'beam':>5}{'batch':>6}" + "".join(f"{c:>12}" for c in COLUMNS))
    systems = [("homegen (KV cache)", lambda beam, batch: time_ours(engine, requests, beam, batch, args.calls))]
    if "nocache" not in skip:
        no_cache = PageEngine(args.checkpoint, use_cache=False, objective="likelihood")
        systems.append(("homegen without KV cache",
                        lambda beam, batch: time_ours(no_cache, requests, beam, batch, args.calls)))
    if engine.has_value_head and "streams" not in skip:
        streams = PageEngine(args.checkpoint, objective="streams")
        systems.append(("homegen, streams objective",
                        lambda beam, batch: time_ours(streams, requests, beam, batch, args.calls)))
    for name, vectorised, key in zip(HF_SYSTEMS, (False, True), ("hf_host", "hf_vectorised")):
        if key not in skip:
            systems.append((name, lambda beam, batch, v=vectorised: time_hf(engine, requests, beam, batch,
                                                                            args.calls, v)))
    for beam in [int(b) for b in args.beams.split(",")]:
        for batch in (1, args.batch):
            rows = {}
            for name, timer in systems:
                timing = timer(beam, batch)
                if timing is None:
                    print(f"{name:<38}{beam:>5}{batch:>6}   (torch/transformers not installed)")
                    continue
                rows[name] = timing.row()
                print(f"{name:<38}{beam:>5}{batch:>6}" + "".join(
                    f"{rows[name][c]:>12,.0f}" if c == "calls" else f"{rows[name][c]:>12,.1f}" for c in COLUMNS),
                      flush=True)
            for hf in HF_SYSTEMS:
                if hf in rows:
                    ratio = rows["homegen (KV cache)"]["tokens/s"] / rows[hf]["tokens/s"]
                    print(f"  homegen (KV cache) / {hf}: {ratio:.1f}x tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

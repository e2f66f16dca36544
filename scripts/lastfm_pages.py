"""Home pages on real listening data: Last.fm (HetRec 2011) converted to page logs, and pages judged by what
users tagged after a cut-off month (data/lastfm.py, evaluation/lastfm.py).

    python scripts/lastfm_pages.py convert --data ../shared/data/lastfm-hetrec2011 --out DIR [--cutoff 2010-08]
        [--themes 20] [--shelves 5] [--items 10] [--seed 0] [--page_months 1]
        [--page_stride N] [--intent_share 0]
        # DIR/catalog.jsonl, DIR/pages.jsonl (training page logs, FORMATS.md §3), DIR/requests_{split}.jsonl
        # (FORMATS.md §4), DIR/heldout_{split}.jsonl and DIR/summary.json; splits: validation, test
    python scripts/lastfm_pages.py benchmark --out DIR [--split validation] [--checkpoint RUN [--step N]]
        [--beam_size N] [--objective likelihood] [--familiarity F[,F...]] [--tune | --intents]
        # the page table: baselines, and with --checkpoint homegen's beam pages and its pointwise ranking;
        # --familiarity: beam pages with each request's `familiarity` set to each value (the first one's pages
        # are the partner of the paired differences); --tune prints the theme-then-artist policy's grid (on
        # validation only); --intents asks every request
        # again with its user's most assigned later theme as a free-text intent ("something chillout")

Train and serve homegen on DIR with the README's page-log commands (`train.py --config
configs/pages_small.py --config.data.page_logs=DIR/pages.jsonl --config.data.catalog=DIR/catalog.jsonl`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

from homegen.data.formats import DataFormatError, json_lines
from homegen.data.lastfm import build, parse_month, read_lastfm
from homegen.evaluation.lastfm import (
    INTENT_METRICS,
    METRICS,
    POPULAR,
    USER_TOP_ARTISTS,
    LogStatistics,
    ThemeThenArtist,
    intent_theme,
    judge_all,
    judge_intents,
)
from homegen.evaluation.pages import standard_error

# Chosen on validation users with `--tune` (docs/BENCHMARKS.md, "Pages on real listening data: Last.fm").
THEME_THEN_ARTIST = ThemeThenArtist(theme_prior=0.1, popularity=1.0, neighbours=0.3, own=3.0)
GRID = {"theme_prior": (0.0, 0.1, 0.3, 1.0), "neighbours": (0.0, 0.3, 1.0, 3.0), "own": (1.0, 3.0, 10.0, 30.0)}


def _write_lines(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def convert(args: argparse.Namespace) -> int:
    data = read_lastfm(args.data)
    built = build(data, parse_month(args.cutoff), themes=args.themes, num_shelves=args.shelves,
                  items_per_shelf=args.items, seed=args.seed, page_months=args.page_months,
                  page_stride=args.page_stride, intent_share=args.intent_share)
    os.makedirs(args.out, exist_ok=True)
    _write_lines(os.path.join(args.out, "catalog.jsonl"), built.catalog)
    _write_lines(os.path.join(args.out, "pages.jsonl"), built.pages)
    for split in built.requests:
        _write_lines(os.path.join(args.out, f"requests_{split}.jsonl"), built.requests[split])
        _write_lines(os.path.join(args.out, f"heldout_{split}.jsonl"), built.heldout[split])
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(built.summary, f, indent=1)
    print(json.dumps(built.summary))
    return 0


def _read(path: str) -> list[dict]:
    return [record for _, record in json_lines(path)]


def homegen_engine(args: argparse.Namespace):
    """The `--checkpoint` run's page engine (JAX and the model load only when one is asked for)."""
    from homegen.serving.engine import PageEngine

    return PageEngine(args.checkpoint, args.step, objective=args.objective)


def beam_pages(engine, requests: list[dict], beam_size: int | None, familiarity: float = 0.0
               ) -> tuple[list, list[list[dict]]]:
    """The parsed requests (with `beam_size` instead of their own, if given, and `familiarity`) and homegen's
    page for each; RuntimeError if any request could not be served."""
    from homegen.serving.requests import parse_request

    parsed = [parse_request({**r, **({"beam_size": beam_size} if beam_size else {}), "familiarity": familiarity})
              for r in requests]
    responses = engine.generate(parsed)
    failed = [(r["request_id"], b["error"]) for r, b in zip(requests, responses) if "error" in b]
    if failed:
        raise RuntimeError(f"homegen could not serve {len(failed)} request(s), first {failed[0][0]}: {failed[0][1]}")
    return parsed, [b["page"] for b in responses]


def homegen_pages(engine, requests: list[dict], beam_size: int | None, familiarities: list[float]
                  ) -> dict[str, list[list[dict]]]:
    """homegen's beam pages at each familiarity, and its pointwise ranking filling the first one's shelves."""
    from homegen.evaluation.pages import pointwise_pages

    pages = {}
    for familiarity in familiarities:
        parsed, beam = beam_pages(engine, requests, beam_size, familiarity)
        pages[f"homegen beam ({engine.objective}, beam {parsed[0].beam_size}, familiarity {familiarity:g})"] = beam
        if len(pages) == 1 and not engine.semantic_ids:  # one token per item: one forward pass per shelf
            pages["homegen pointwise (same model, beam's shelves)"] = pointwise_pages(
                engine, parsed, [[s["shelf"] for s in page] for page in beam])
    return pages


def table(pages: dict[str, list[list[dict]]], heldout: list[dict], requests: list[dict], partner: str | None) -> None:
    """Prints mean +- standard error of each metric per policy, and the paired difference in the headline
    metric against `partner`."""
    scores = {name: judge_all(p, heldout, requests) for name, p in pages.items()}
    print(f"{'policy':<48} " + " ".join(f"{m:>22}" for m in METRICS) + f" {'pair_ndcg vs ' + (partner or '-'):>30}")
    for name, values in scores.items():
        cells = " ".join(f"{v.mean():>13.4f} +- {standard_error(v):.4f}" for v in values.values())
        diff = ""
        if partner and name != partner:
            gain = values["pair_ndcg"] - scores[partner]["pair_ndcg"]
            diff = f"{gain.mean():+.4f} +- {standard_error(gain):.4f} ({gain.mean() / standard_error(gain):+.1f} se)"
        print(f"{name:<48} {cells} {diff:>30}", flush=True)


def intents(args: argparse.Namespace, requests: list[dict], heldout: list[dict], stats: LogStatistics) -> int:
    """Each request asked without and with an intent ("something <tag>") for the theme its user assigned most
    after the cut-off; prints how the pages answer it (evaluation/lastfm.py `judge_intent`) and the paired gain
    of the intent."""
    with open(os.path.join(args.out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    themes = [intent_theme([tuple(p) for p in h["pairs"]], summary["themes"]) for h in heldout]
    asked = [{**r, "context": {**r.get("context", {}), "intent": summary["theme_intents"][t]}}
             for r, t in zip(requests, themes)]
    pages = {"theme-then-artist": THEME_THEN_ARTIST.pages(stats, requests),
             "theme-then-artist, the intent's theme first": THEME_THEN_ARTIST.pages(stats, requests, themes)}
    if args.checkpoint:
        engine = homegen_engine(args)
        for label, batch in (("no intent", requests), ("intent", asked)):
            pages[f"homegen, {label}"] = beam_pages(engine, batch, args.beam_size, args.familiarity[0])[1]
    scores = {name: {**judge_intents(p, heldout, requests, themes), **judge_all(p, heldout, requests)}
              for name, p in pages.items()}
    columns = (*INTENT_METRICS, "pair_ndcg")
    print(f"{'pages':<46} " + " ".join(f"{m:>20}" for m in columns))
    for name, values in scores.items():
        print(f"{name:<46} " + " ".join(f"{values[m].mean():>11.4f} +- {standard_error(values[m]):.4f}" for m in columns))
    for with_intent, without in (("homegen, intent", "homegen, no intent"),
                                 ("theme-then-artist, the intent's theme first", "theme-then-artist")):
        if with_intent in scores:
            gain = scores[with_intent]["theme_recall"] - scores[without]["theme_recall"]
            print(f"theme_recall, {with_intent} minus {without}: {gain.mean():+.4f} +- {standard_error(gain):.4f}")
    return 0


def benchmark(args: argparse.Namespace) -> int:
    requests = _read(os.path.join(args.out, f"requests_{args.split}.jsonl"))
    heldout = _read(os.path.join(args.out, f"heldout_{args.split}.jsonl"))
    stats = LogStatistics.from_pages(_read(os.path.join(args.out, "pages.jsonl")))
    print(f"{len(requests)} {args.split} requests; {len(stats.items)} artists and {len(stats.shelves)} themes in the logs")
    if args.tune:
        if args.split != "validation":
            print("lastfm_pages.py: error: --tune chooses settings, so it runs on validation only", file=sys.stderr)
            return 2
        for values in itertools.product(*GRID.values()):
            policy = ThemeThenArtist(**dict(zip(GRID, values)))
            ndcg = judge_all(policy.pages(stats, requests), heldout, requests)["pair_ndcg"]
            print(f"{dict(zip(GRID, values))}: pair_ndcg {ndcg.mean():.4f} +- {standard_error(ndcg):.4f}", flush=True)
        return 0
    if args.intents:
        return intents(args, requests, heldout, stats)
    pages = {"popular themes, popular artists": POPULAR.pages(stats, requests),
             "popular themes, the user's own artists first": USER_TOP_ARTISTS.pages(stats, requests),
             "theme-then-artist (tuned on validation)": THEME_THEN_ARTIST.pages(stats, requests)}
    partner = None
    if args.checkpoint:
        found = homegen_pages(homegen_engine(args), requests, args.beam_size, args.familiarity)
        partner = next(iter(found))
        pages = {**found, **pages}
    table(pages, heldout, requests, partner)
    return 0


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="Last.fm files -> catalog, page logs, requests and held-out assignments")
    c.add_argument("--data", required=True, help="the lastfm-hetrec2011 folder")
    c.add_argument("--out", required=True)
    c.add_argument("--cutoff", default="2010-08", help="first held-out month, YYYY-MM")
    c.add_argument("--themes", type=int, default=20, help="the most used tags before the cut-off become shelves")
    c.add_argument("--shelves", type=int, default=5, help="shelves a request asks for")
    c.add_argument("--items", type=int, default=10, help="artists per shelf a request asks for")
    c.add_argument("--seed", type=int, default=0, help="the validation/test split of users")
    c.add_argument("--intent_share", type=float, default=0.0,
                   help="share of training pages whose first theme is also their intent ('something <tag>')")
    c.add_argument("--page_months", type=int, default=1, help="months of a user's tags gathered in one training page")
    c.add_argument("--page_stride", type=int, default=None,
                   help="months between training windows' ends (default --page_months; less: overlapping windows)")
    b = commands.add_parser("benchmark", help="judge baselines (and a checkpoint's pages) on a split")
    b.add_argument("--out", required=True, help="a `convert` folder")
    b.add_argument("--split", default="validation", choices=["validation", "test"])
    b.add_argument("--checkpoint", default=None, help="a run trained on the folder's pages.jsonl")
    b.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: its newest readable one)")
    b.add_argument("--beam_size", type=int, default=None, help="instead of the requests' own (4); 1 is greedy")
    b.add_argument("--objective", default="likelihood", choices=["likelihood", "streams"],
                   help="beam search's objective (every logged item is engaged, so the value head learns nothing)")
    b.add_argument("--familiarity", type=_numbers, default=[0.0],
                   help="comma-separated values of the requests' familiarity (history items' logit bonus)")
    b.add_argument("--tune", action="store_true", help="print the theme-then-artist grid instead")
    b.add_argument("--intents", action="store_true",
                   help="ask each request with its user's most assigned later theme as an intent ('something <tag>')")
    args = parser.parse_args(argv)
    try:
        return convert(args) if args.command == "convert" else benchmark(args)
    except (DataFormatError, ValueError, FileNotFoundError) as e:
        print(f"lastfm_pages.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

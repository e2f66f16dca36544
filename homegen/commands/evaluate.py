"""Evaluates a checkpoint.

    python scripts/evaluate.py --checkpoint RUN [--split test] [--step N] [--out DIR]

Interaction data (next-item): leave-one-out, ranking over all items at the last position, HR@K (= Recall@K),
NDCG@K for K in 5/10/20/50 and MRR, with already-seen items kept in the ranking and filtered out. The step
is the best kept checkpoint by the run's validation metric (model selection on validation only).
Synthetic-world pages: exact expected engagement (as a fraction of the oracle's), validity, diversity,
coverage and offline log metrics for homegen beam search and sampling, a pointwise baseline, the logging
policy and a popularity page; with a value head, also likelihood beam search, the value head's pointwise
pages, every page's predicted streams, and beam search's paired gain over pointwise. Tables print;
results.json, metrics.png (bars against the anchors) and training.png (curves from the run's TensorBoard
files) go to --out; the plots need the `plots` extra (matplotlib), without which only results.json is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from homegen.commands.search_flags import add_search_flags, search_overrides
from homegen.evaluation.next_item import TIGER, evaluate_next_item, print_ranking_table
from homegen.evaluation.pages import evaluate_pages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=["validation", "test"],
                        help="pages: the world's first --max_users requests (test) or its last (validation)")
    parser.add_argument("--step", type=int, default=None, help="default: best by the run's validation metric")
    parser.add_argument("--max_users", type=int, default=0, help="0: every user of the split")
    parser.add_argument("--ranking", default="all", choices=["all", "score", "beam"],
                        help="next-item ranking: by scoring all items, by beam search, or both (semantic IDs: beam)")
    parser.add_argument("--beam_size", type=int, default=None,
                        help="beam size: pages (default 4); next-item beam ranking (default: the run's eval.beam_size)")
    parser.add_argument("--shelves_as_requested", action="store_true",
                        help="pages: keep each request's min/max items per shelf (default: full shelves, as the oracle)")
    parser.add_argument("--watch_shelf", default=None,
                        help="pages: report how many pages show this shelf type and the expected streams of its slots")
    parser.add_argument("--catalog", default=None,
                        help="pages: add this catalog's new items (serve.py --catalog) before decoding, and report "
                             "where they land (a run trained with data.hold_out_release_days)")
    add_search_flags(parser)
    parser.add_argument("--out", default=None, help="folder for results.json (default: RUN/eval)")
    args = parser.parse_args(argv)

    from homegen.training.checkpoints import CheckpointError, Checkpoints, checkpoint_dir, run_folder
    from homegen.training.state import count_params

    try:
        ckpt_dir, workdir = checkpoint_dir(args.checkpoint), run_folder(args.checkpoint)
        checkpoints = Checkpoints(ckpt_dir, read_only=True)
        step, selected = checkpoints.selected_step(args.step)
        step, meta = checkpoints.read_meta(step)
        _, params = checkpoints.restore_model_params(step)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    out_dir = args.out or os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    progress = meta.get("progress", {})
    summary = {"checkpoint": os.path.abspath(ckpt_dir), "step": step, "split": args.split,
               "parameters": count_params(params), "selected_by": selected,
               "item_tokens": meta["config"]["data"].get("item_tokens", "atomic"),
               "epochs": progress.get("epochs"), "training_seconds": progress.get("seconds")}
    trained = (f", {summary['epochs']:.1f} epochs, {summary['training_seconds'] / 60:.1f} min of training"
               if progress else "")
    try:
        if meta["kind"] == "sequences":
            result = evaluate_next_item(meta, workdir, args.split, params, args.max_users, args.ranking,
                                        args.beam_size)
            summary.update(result)
            name = os.path.splitext(os.path.basename(meta["config"]["data"]["interactions"]))[0]
            print(f"{name}: step {step} ({selected}), {summary['item_tokens']} item tokens, "
                  f"{summary['parameters']:,} parameters{trained}; {result['users']:,} users, split {args.split}")
            print_ranking_table(name, result)
        else:
            print(f"step {step} ({selected}), {summary['parameters']:,} parameters{trained}")
            summary.update(evaluate_pages(args.checkpoint, step, meta, workdir, args.max_users or 200,
                                          full_shelves=not args.shelves_as_requested,
                                          beam_size=args.beam_size or 4, catalog=args.catalog, split=args.split,
                                          watch_shelf=args.watch_shelf, search=search_overrides(args)))
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    try:
        write_plots(summary, meta, workdir, out_dir)
        print(f"wrote results.json, metrics.png and training.png to {out_dir}")
    except ImportError as e:
        print(f"wrote results.json to {out_dir}; no plots ({e})")
    return 0


def write_plots(summary: dict, meta: dict, workdir: str, out_dir: str) -> None:
    from homegen.evaluation.plots import plot_bars, plot_training_curves

    if meta["kind"] == "sequences":
        name = os.path.splitext(os.path.basename(meta["config"]["data"]["interactions"]))[0]
        groups = {f"homegen ({label})": metrics for label, metrics in summary["rankings"].items()}
        if name in TIGER:
            groups["TIGER (paper)"] = TIGER[name]
        plot_bars(groups, ["hr@5", "ndcg@5", "hr@10", "ndcg@10"], f"{name}, {summary['split']} split",
                  os.path.join(out_dir, "metrics.png"))
        tags = ("loss", "validation_loss", "validation_hr_10", "validation_ndcg_10")
    else:
        plot_bars({"expected streams / oracle": {k: v["of_oracle"] for k, v in summary["pages"].items()}},
                  list(summary["pages"]), "page quality (fraction of the oracle)", os.path.join(out_dir, "metrics.png"))
        tags = ("loss", "validation_loss")
    plot_training_curves(os.path.join(workdir, "tensorboard"), os.path.join(out_dir, "training.png"), tags)


if __name__ == "__main__":
    sys.exit(main())

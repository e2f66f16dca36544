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
files) go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RANKING_COLUMNS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "hr@50", "ndcg@50", "mrr")
TIGER = {  # ANCHORS.md, TIGER (NeurIPS 2023) Table 1: R@5, N@5, R@10, N@10
    "Sports_and_Outdoors": {"hr@5": .0264, "ndcg@5": .0181, "hr@10": .0400, "ndcg@10": .0225},
    "Toys_and_Games": {"hr@5": .0521, "ndcg@5": .0371, "hr@10": .0712, "ndcg@10": .0432},
}


def evaluate_next_item(meta: dict, workdir: str, split: str, params, max_users: int, ranking: str,
                       beam_size: int | None) -> dict:
    """Ranking metrics of the split's users, for each ranking method and both seen-item conventions:
    {"users", "seconds", "rankings": {"<method>, seen kept|filtered": metrics}}."""
    import jax

    from configs.base import base_config
    from data.builders import InteractionDataset
    from model.sharding import make_mesh
    from model.transformer import TransformerConfig
    from training.checkpoints import vocabulary_from_json
    from training.evaluation import make_ranker, ranking_metrics, validation_users
    from training.state import Trainer

    cfg = base_config()  # defaults for settings that checkpoints from older versions do not store
    cfg.update(meta["config"])
    if beam_size:
        cfg.eval.beam_size = beam_size
    data_dir = cfg.data.data_dir or os.path.join(workdir, "tfds")
    builder = InteractionDataset.for_file(cfg.data.interactions, data_dir, cfg.data.interactions_format)
    builder.download_and_prepare()
    users = validation_users(builder.as_data_source()[split], max_users)
    vocab = vocabulary_from_json(meta["vocab"])
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = Trainer(TransformerConfig(**meta["model"]), cfg.train, mesh, [tuple(r) for r in cfg.rules])
    params = jax.device_put(params, trainer.param_shardings)
    methods = [ranking]
    if ranking == "all":  # semantic IDs can only be ranked by beam search
        methods = ["score", "beam"] if vocab.items.tokens_per_item == 1 else ["beam"]
    result = {"users": len(users), "seconds": {}, "rankings": {}}
    for method in methods:
        ranker = make_ranker(trainer, vocab, cfg, method)
        start = time.time()
        # Beam search ranks only its beam: metrics@K need K <= beam size.
        ks = tuple(k for k in (5, 10, 20, 50) if method == "score" or k <= cfg.eval.beam_size)
        for convention, filter_seen in (("seen kept", False), ("seen filtered", True)):
            ranks = ranker.rank(params, users, filter_seen=filter_seen)
            result["rankings"][f"{method}, {convention}"] = ranking_metrics(ranks, ks)
        result["seconds"][method] = round(time.time() - start, 1)
    return result


def print_ranking_table(name: str, result: dict) -> None:
    print(f"{'':<30}" + "".join(f"{k:>9}" for k in RANKING_COLUMNS))
    rows = [(f"homegen ({label})", metrics) for label, metrics in result["rankings"].items()]
    if name in TIGER:
        rows.append(("TIGER (paper)", TIGER[name]))
    for label, metrics in rows:
        print(f"{label:<30}" + "".join(f"{metrics[k]:>9.4f}" if k in metrics else f"{'':>9}" for k in RANKING_COLUMNS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--step", type=int, default=None, help="default: best by the run's validation metric")
    parser.add_argument("--max_users", type=int, default=0, help="0: every user of the split")
    parser.add_argument("--ranking", default="all", choices=["all", "score", "beam"],
                        help="next-item ranking: by scoring all items, by beam search, or both (semantic IDs: beam)")
    parser.add_argument("--beam_size", type=int, default=None,
                        help="beam size: pages (default 4); next-item beam ranking (default: the run's eval.beam_size)")
    parser.add_argument("--shelves_as_requested", action="store_true",
                        help="pages: keep each request's min/max items per shelf (default: full shelves, as the oracle)")
    parser.add_argument("--out", default=None, help="folder for results.json (default: RUN/eval)")
    args = parser.parse_args(argv)

    from training.checkpoints import CheckpointError, Checkpoints, checkpoint_dir
    from training.state import count_params

    ckpt_dir = checkpoint_dir(args.checkpoint)
    workdir = os.path.dirname(ckpt_dir) if ckpt_dir != args.checkpoint else args.checkpoint
    try:
        checkpoints = Checkpoints(ckpt_dir, read_only=True)
        _, meta = checkpoints.read_meta(args.step)
        train_cfg = meta["config"]["train"]
        best_metric = train_cfg.get("best_metric", "validation_loss")
        best = checkpoints.best_step(best_metric, train_cfg.get("best_mode", "min"))
        step = args.step or best or checkpoints.latest_step()
        selected = ("--step" if args.step else f"best {best_metric} on validation" if best
                    else "latest (no validation metric stored)")
        step, meta = checkpoints.read_meta(step)
        _, params = checkpoints.restore_params(step)
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
    if meta["kind"] == "sequences":
        try:
            result = evaluate_next_item(meta, workdir, args.split, params, args.max_users, args.ranking, args.beam_size)
        except ValueError as e:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
            return 2
        summary.update(result)
        name = os.path.splitext(os.path.basename(meta["config"]["data"]["interactions"]))[0]
        print(f"{name}: step {step} ({selected}), {summary['item_tokens']} item tokens, "
              f"{summary['parameters']:,} parameters{trained}; {result['users']:,} users, split {args.split}")
        print_ranking_table(name, result)
    else:
        print(f"step {step} ({selected}), {summary['parameters']:,} parameters{trained}")
        from training.page_quality import evaluate_pages

        summary.update(evaluate_pages(args.checkpoint, step, meta, workdir, args.max_users or 200,
                                      full_shelves=not args.shelves_as_requested, beam_size=args.beam_size or 4))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_plots(summary, meta, workdir, out_dir)
    print(f"wrote results.json, metrics.png and training.png to {out_dir}")
    return 0


def write_plots(summary: dict, meta: dict, workdir: str, out_dir: str) -> None:
    from training.plots import plot_bars, plot_training_curves

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

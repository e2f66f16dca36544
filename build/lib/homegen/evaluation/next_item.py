"""Next-item evaluation of an interaction-data checkpoint on held-out users: HR@K / NDCG@K / MRR by each
ranking method, with already-seen items kept in the ranking and filtered out, beside TIGER's published
numbers (ANCHORS.md)."""

from __future__ import annotations

import os
import time

import jax

from homegen.configs.base import base_config
from homegen.data.builders import InteractionDataset
from homegen.data.vocab import Vocabulary
from homegen.model.sharding import make_mesh
from homegen.model.transformer import TransformerConfig
from homegen.training.state import Trainer
from homegen.training.validation import make_ranker, ranking_metrics, validation_users

RANKING_COLUMNS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "hr@50", "ndcg@50", "mrr")
TIGER = {  # ANCHORS.md, TIGER (NeurIPS 2023) Table 1: R@5, N@5, R@10, N@10
    "Sports_and_Outdoors": {"hr@5": .0264, "ndcg@5": .0181, "hr@10": .0400, "ndcg@10": .0225},
    "Toys_and_Games": {"hr@5": .0521, "ndcg@5": .0371, "hr@10": .0712, "ndcg@10": .0432},
}


def evaluate_next_item(meta: dict, workdir: str, split: str, params, max_users: int, ranking: str,
                       beam_size: int | None) -> dict:
    """Ranking metrics of the split's users, for each ranking method and both seen-item conventions:
    {"users", "seconds", "rankings": {"<method>, seen kept|filtered": metrics}}."""
    cfg = base_config()  # defaults for settings that checkpoints from older versions do not store
    cfg.update(meta["config"])
    if beam_size:
        cfg.eval.beam_size = beam_size
    data_dir = cfg.data.data_dir or os.path.join(workdir, "tfds")
    builder = InteractionDataset.for_file(cfg.data.interactions, data_dir, cfg.data.interactions_format)
    builder.download_and_prepare()
    users = validation_users(builder.as_data_source()[split], max_users)
    vocab = Vocabulary.from_json(meta["vocab"])
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

"""Shared settings of the Amazon next-item configs: a SASRec-sized decoder trained with full softmax over
all item tokens at every position, sequences packed into rows, dropout 0.5 on residual branches and 0.3 on
the input embeddings, early stopping and model selection on validation NDCG@10 with seen items filtered
(settings chosen on Toys validation users: docs/BENCHMARKS.md, Next-item quality).

Item tokens `atomic` (one token per item, up to 51 history items, embedded with the item's S3-Rec
category/brand attributes from the file next to the sequence file; label smoothing 0.1) or `semantic` (3
residual k-means codes of 256 plus a collision code per item, from co-occurrence and those attributes; 20
history items as in TIGER; ranked by beam search over the code trie)."""

import os

from homegen.configs.base import base_config


def shared_data(name: str) -> str:
    """The absolute path of a file of the project's benchmark data, `../shared/data/NAME` beside the checkout,
    so a config works from any directory (installed elsewhere it does not exist, and training says which
    flag sets the file)."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(checkout), "shared", "data", name)


def amazon_config(path: str, item_tokens: str = "atomic", steps: int = 5000):
    """The config for the sequence file `path`; `steps` is the most it trains (the cosine schedule's length;
    early stopping usually ends it sooner)."""
    if item_tokens not in ("atomic", "semantic"):
        raise ValueError(f"item tokens must be 'atomic' or 'semantic', got {item_tokens!r}")
    c = base_config()
    c.data.interactions = path
    c.data.seq_len = 56  # BOS SEP SEP PAGE SHELF, up to 51 history items and the target
    c.data.pack = True
    c.data.stream_weight = 0.0
    c.model.d_model = 128
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.num_kv_heads = 2
    c.model.head_dim = 64
    c.model.mlp_dim = 512
    c.model.dropout = 0.5
    c.model.embed_dropout = 0.3
    c.train.steps = steps
    c.train.batch_size = 32  # packed rows of 56 tokens: about 120 users per step
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 300
    c.train.weight_decay = 0.1
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.eval_batches = 4
    c.train.keep_best = 2
    c.train.best_metric = "validation_ndcg@10"
    c.train.best_mode = "max"
    c.train.patience = 3
    c.eval.next_item = True
    c.eval.filter_seen = True
    c.eval.max_users = 5000
    if item_tokens == "semantic":  # less dropout than atomic: 0.5/0.3 trained slower on Sports validation
        c.model.dropout, c.model.embed_dropout = 0.3, 0.0
        c.data.item_tokens = "semantic"
        c.data.seq_len = 4 + 21 * 4  # 20 history items + the target, 4 codes each
        c.train.batch_size = 48  # packed rows of 88 tokens: about as many users per step as atomic
        # Validation ranks by beam search: 2,000 users and 20 beams (on Sports validation, beam 50 gave the
        # same @10 figures at 2.2x the time).
        c.eval.max_users, c.eval.beam_size = 2000, 20
    else:  # chosen on Toys validation (2026-11-28): label smoothing, then category/brand embeddings
        c.loss.label_smoothing = 0.1
        c.data.item_attributes = True  # from the NAME_item2attributes.json next to the sequence file
    return c

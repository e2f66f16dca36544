"""Page generation on the small synthetic world (10^4 items, 10^5 pages), or on user-given page logs
with --config.data.page_logs=FILE.jsonl [--config.data.catalog=FILE] (the source follows from the file given).
`configs/pages_small.py:semantic` uses semantic item IDs (4 tokens per item, so 512-token rows)."""

from homegen.configs.base import base_config


def get_config(item_tokens: str = "atomic"):
    if item_tokens not in ("", "atomic", "semantic"):
        raise ValueError(f"item tokens must be 'atomic' or 'semantic', got {item_tokens!r}")
    c = base_config()
    c.data.preset = "small"
    c.data.seq_len = 256
    c.model.d_model = 256
    c.model.num_layers = 4
    c.model.num_heads = 8
    c.model.num_kv_heads = 4
    c.model.head_dim = 32
    c.model.mlp_dim = 1024
    c.model.dropout = 0.1
    c.model.value_head = True  # beam search maximises predicted streams (docs/BENCHMARKS.md)
    c.data.stream_weight = 10.0
    c.train.steps = 5000
    c.train.batch_size = 64
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.eval_every = 500
    if item_tokens == "semantic":
        c.data.item_tokens = "semantic"
        c.data.seq_len = 512  # a 6 x 10 page is 247 tokens, 30 history items 120 more
    return c

"""Page generation on the small synthetic world (10^4 items, 10^5 pages), or on user-given page logs
with --config.data.page_logs=FILE.jsonl [--config.data.catalog=FILE] (the source follows from the file given)."""

from homegen.configs.base import base_config


def get_config():
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
    return c

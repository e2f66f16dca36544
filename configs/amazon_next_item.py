"""Shared settings of the Amazon next-item configs (SASRec-sized, full softmax over all items)."""

from configs.base import base_config


def amazon_config(path: str):
    c = base_config()
    c.data.source = "interactions"
    c.data.interactions = path
    c.data.seq_len = 56  # 50 items + structure tokens
    c.data.pack = False
    c.data.stream_weight = 0.0
    c.model.d_model = 128
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.num_kv_heads = 2
    c.model.head_dim = 64
    c.model.mlp_dim = 512
    c.model.dropout = 0.3
    c.train.steps = 20000
    c.train.batch_size = 128
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 500
    c.train.weight_decay = 0.1
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.eval.next_item = True
    c.eval.max_users = 5000
    return c

"""A ≥100M-parameter model for one GPU: bf16 compute, fp32 parameters, the medium synthetic world."""

from homegen.configs.base import base_config


def get_config():
    c = base_config()
    c.data.preset = "medium"
    c.data.seq_len = 512
    c.model.d_model = 768
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.num_kv_heads = 4
    c.model.head_dim = 64
    c.model.mlp_dim = 3072
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"
    c.model.fused_attention = True  # cuDNN flash attention: 71.6 against 118 ms a step on an H200 (BENCHMARKS)
    c.loss.kind = "sampled"
    c.loss.num_negatives = 8192
    c.train.steps = 20000
    c.train.batch_size = 64
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 1000
    return c

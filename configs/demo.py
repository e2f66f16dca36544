"""A small model on the tiny synthetic world: trains in a few minutes on a laptop CPU.
`configs/demo.py:preference` is its preference stage (DPO on pairs from a trained run: configs/base.py)."""

from homegen.configs.base import base_config, preference_stage


def get_config(stage: str = ""):
    if stage not in ("", "preference"):
        raise ValueError(f"the stage must be '' or 'preference', got {stage!r}")
    c = base_config()
    c.data.preset = "tiny"
    c.data.seq_len = 128
    c.data.max_history = 20
    c.data.sentencepiece_vocab = 300
    c.data.stream_weight = 10.0  # docs/BENCHMARKS.md: better pages than 1
    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 16
    c.model.mlp_dim = 256
    c.model.value_head = True  # beam search maximises predicted streams (docs/BENCHMARKS.md)
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 30
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.checkpoint_every = 100
    return preference_stage(c) if stage == "preference" else c

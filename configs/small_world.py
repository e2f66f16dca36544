"""The best page recipe measured on the small synthetic world (10^4 items, 10^5 logged pages) within a 2-core
CPU budget (docs/BENCHMARKS.md, Page quality): the demo model at twice its width, items embedded with their
catalog attributes, the request's whole 30-item history, the value head's loss weighted 5x, 9,000 steps, and
a streams beam search that considers 128 candidates per step with a 0.001 log-probability prior (each chosen
on validation requests).
`configs/small_world.py:preference` is its preference stage (DPO on pairs from a trained run)."""

from homegen.configs.base import preference_stage
from homegen.configs.demo import get_config as demo_config


def get_config(stage: str = ""):
    if stage not in ("", "preference"):
        raise ValueError(f"the stage must be '' or 'preference', got {stage!r}")
    c = demo_config()
    c.data.preset = "small"
    c.data.item_attributes = True
    c.data.max_history = 30
    c.model.d_model = 128
    c.model.head_dim = 32
    c.model.mlp_dim = 512
    c.loss.value_weight = 5.0
    c.train.steps = 9000
    c.train.eval_every = 3000
    c.train.checkpoint_every = 3000
    c.serve.stream_candidates = 128
    c.serve.prior_weight = 0.001
    return preference_stage(c) if stage == "preference" else c

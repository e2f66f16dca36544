"""Next-item on MovieLens-1M, the HSTU comparison in ANCHORS.md (leave-one-out, full ranking, up to 200
history items). No data ships with homegen: point it at ML-1M's ratings.dat (`user::item::rating::time`),

    python train.py --config configs/movielens_1m.py --workdir RUN --config.data.interactions=PATH/ratings.dat
"""

from homegen.configs.amazon_next_item import amazon_config


def get_config():
    c = amazon_config("ratings.dat")
    c.data.seq_len = 204  # 200 items + the structure tokens
    c.model.dropout = 0.2
    c.model.d_model = 64
    c.model.head_dim = 32
    c.model.mlp_dim = 256
    c.train.batch_size = 64  # unpacked in practice: most ML-1M users have more than 200 ratings
    c.train.steps = 4000
    return c

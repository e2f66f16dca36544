"""Next-item on Amazon Sports and Outdoors (5-core); override the path with --config.data.interactions
(and --config.data.item_features for semantic IDs)."""

from homegen.configs.amazon_next_item import amazon_config


def get_config(item_tokens: str = "atomic"):
    """`--config configs/amazon_sports.py` (atomic item tokens) or `--config configs/amazon_sports.py:semantic`."""
    return amazon_config("../shared/data/amazon/Sports_and_Outdoors.txt", item_tokens or "atomic")

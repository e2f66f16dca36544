"""Next-item on Amazon Toys and Games (5-core); override the path with --config.data.interactions
(and --config.data.item_features for semantic IDs)."""

from homegen.configs.amazon_next_item import amazon_config


def get_config(item_tokens: str = "atomic"):
    """`--config configs/amazon_toys.py` (atomic item tokens) or `--config configs/amazon_toys.py:semantic`."""
    return amazon_config("../shared/data/amazon/Toys_and_Games.txt", item_tokens or "atomic")

"""Next-item on Amazon Toys and Games (5-core); override the path with --config.data.interactions
(its item attributes are read from the NAME_item2attributes.json next to it, or --config.data.item_features;
a file without them needs --config.data.item_attributes=False)."""

from homegen.configs.amazon_next_item import amazon_config, shared_data


def get_config(item_tokens: str = "atomic"):
    """`--config configs/amazon_toys.py` (atomic item tokens) or `--config configs/amazon_toys.py:semantic`."""
    return amazon_config(shared_data("amazon/Toys_and_Games.txt"), item_tokens or "atomic")

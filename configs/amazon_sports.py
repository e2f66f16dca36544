"""Next-item on Amazon Sports and Outdoors (5-core); override the path with --config.data.interactions
(its item attributes are read from the NAME_item2attributes.json next to it, or --config.data.item_features;
a file without them needs --config.data.item_attributes=False)."""

from homegen.configs.amazon_next_item import amazon_config, shared_data


def get_config(item_tokens: str = "atomic"):
    """`--config configs/amazon_sports.py` (atomic item tokens) or `--config configs/amazon_sports.py:semantic`."""
    # 1.8x Toys' users: 8,000 steps is about 27 epochs (Toys' best step was in its 21st of at most 35).
    return amazon_config(shared_data("amazon/Sports_and_Outdoors.txt"), item_tokens or "atomic", steps=8000)

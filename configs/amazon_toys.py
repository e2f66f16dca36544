"""Next-item on Amazon Toys and Games (5-core); override the path with --config.data.interactions."""

from configs.amazon_next_item import amazon_config


def get_config():
    return amazon_config("../shared/data/amazon/Toys_and_Games.txt")

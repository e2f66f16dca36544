"""Next-item on Amazon Sports and Outdoors (5-core); override the path with --config.data.interactions."""

from configs.amazon_next_item import amazon_config


def get_config():
    return amazon_config("../shared/data/amazon/Sports_and_Outdoors.txt")

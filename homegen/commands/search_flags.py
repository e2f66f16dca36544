"""Beam search's settings as command-line flags: evaluate, serve and preference_pairs let a user try other values
on a trained checkpoint than the ones its config's `serve` section chose on validation."""

from __future__ import annotations

import argparse

SEARCH_SETTINGS = ("stream_candidates", "prior_weight", "item_width")


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    """--stream_candidates, --prior_weight and --item_width, each defaulting to the run's serve config."""
    parser.add_argument("--stream_candidates", type=int, default=None,
                        help="streams beam search: items considered per step (default: the run's serve config)")
    parser.add_argument("--prior_weight", type=float, default=None,
                        help="streams beam search: log-probability weight (default: the run's serve config)")
    parser.add_argument("--item_width", type=int, default=None,
                        help="semantic IDs: hypotheses per beam inside an item, cut back to the beam size when "
                             "items complete (default: the run's serve config)")


def search_overrides(args: argparse.Namespace) -> dict:
    """The flags' values as `PageEngine` keyword arguments (None: the run's own setting)."""
    return {name: getattr(args, name) for name in SEARCH_SETTINGS}

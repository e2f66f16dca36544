"""Train / validation / test splits: leave-one-out per user and by time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from homegen.data.formats import PageLog, UserSequence

SPLITS = ("train", "validation", "test")


def leave_one_out(users: Iterable[UserSequence], min_length: int = 3) -> dict[str, list[UserSequence]]:
    """The TIGER / S3-Rec protocol: test = the whole sequence (target: last item), validation = all but the
    last (target: second-to-last), train = all but the last two. Users with fewer than `min_length` items
    go to train only."""
    out: dict[str, list[UserSequence]] = {s: [] for s in SPLITS}
    for user in users:
        n = len(user.items)
        if n < min_length:
            out["train"].append(user)
            continue
        for split, end in (("train", n - 2), ("validation", n - 1), ("test", n)):
            stamps = user.timestamps[:end] if user.timestamps else None
            out[split].append(UserSequence(user.user_id, user.items[:end], stamps))
    return out


def split_sequences_by_time(users: Iterable[UserSequence], valid_start: float,
                            test_start: float) -> dict[str, list[UserSequence]]:
    """Time-based split: train holds interactions before `valid_start`; validation and test hold, per user,
    the prefix ending at their first interaction in [valid_start, test_start) and [test_start, inf)."""
    if valid_start > test_start:
        raise ValueError("valid_start must not be after test_start")
    out: dict[str, list[UserSequence]] = {s: [] for s in SPLITS}
    for user in users:
        if user.timestamps is None:
            raise ValueError(f"user {user.user_id!r} has no timestamps; a time split needs them")
        stamps = user.timestamps
        train_end = sum(t < valid_start for t in stamps)
        if train_end:
            out["train"].append(UserSequence(user.user_id, user.items[:train_end], stamps[:train_end]))
        for split, lo, hi in (("validation", valid_start, test_start), ("test", test_start, float("inf"))):
            hits = [k for k, t in enumerate(stamps) if lo <= t < hi]
            if hits:
                end = hits[0] + 1
                out[split].append(UserSequence(user.user_id, user.items[:end], stamps[:end]))
    return out


def time_split(timestamp: float | None, valid_start: float | None, test_start: float | None) -> str:
    """The split of a page logged at `timestamp` (pages without one go to train)."""
    if timestamp is None:
        return "train"
    if test_start is not None and timestamp >= test_start:
        return "test"
    if valid_start is not None and timestamp >= valid_start:
        return "validation"
    return "train"


def page_split(page: PageLog, valid_start: float | None, test_start: float | None) -> str:
    """The split of one page log by its timestamp (pages without one go to train)."""
    return time_split(page.timestamp, valid_start, test_start)


def time_cut_offs(histogram: Mapping[float, int], validation_fraction: float,
                  test_fraction: float) -> tuple[float | None, float | None]:
    """(validation start, test start): the linear quantiles 1 - validation - test and 1 - test of every
    timestamp, from each distinct timestamp's count (so its size is the number of distinct timestamps, not of
    pages); None for a fraction of 0 or no timestamps."""
    if not histogram:
        return None, None
    values = sorted(histogram)
    ends = np.cumsum([histogram[v] for v in values])  # sorted position after each value's last copy
    return cut_offs_from_ranks(int(ends[-1]), lambda rank: values[int(np.searchsorted(ends, rank, side="right"))],
                               validation_fraction, test_fraction)


def time_splits(validation_fraction: float, test_fraction: float) -> list[str]:
    """The splits a time split makes: train, then validation and test where their fraction is > 0."""
    return ["train"] + (["validation"] if validation_fraction else []) + (["test"] if test_fraction else [])


def cut_off_quantiles(validation_fraction: float, test_fraction: float) -> list[float]:
    """The quantiles of the timestamps at which validation and test start (for the fractions that are > 0)."""
    return ([1 - validation_fraction - test_fraction] if validation_fraction else []) + \
        ([1 - test_fraction] if test_fraction else [])


def quantile_ranks(total: int, q: float) -> tuple[int, int]:
    """The two sorted positions (0-based) among `total` timestamps that the linear quantile `q` interpolates."""
    below = int(np.floor(q * (total - 1)))
    return below, min(below + 1, total - 1)


def cut_offs_from_ranks(total: int, value_at: Callable[[int], float], validation_fraction: float,
                        test_fraction: float) -> tuple[float | None, float | None]:
    """`time_cut_offs` given `total` timestamps and `value_at(rank)`, the timestamp at a sorted position (only
    `quantile_ranks` positions are asked: a caller in bounded memory finds just those)."""

    def quantile(q: float) -> float:
        position = q * (total - 1)
        below, above = quantile_ranks(total, q)
        lo, hi = value_at(below), value_at(above)
        return float(lo + (hi - lo) * (position - below))

    return (quantile(1 - validation_fraction - test_fraction) if validation_fraction else None,
            quantile(1 - test_fraction) if test_fraction else None)

"""Train / validation / test splits: leave-one-out per user and by time."""

from __future__ import annotations

from collections.abc import Iterable

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


def page_split(page: PageLog, valid_start: float | None, test_start: float | None) -> str:
    """The split of one page log by its timestamp (pages without one go to train)."""
    if page.timestamp is None:
        return "train"
    if test_start is not None and page.timestamp >= test_start:
        return "test"
    if valid_start is not None and page.timestamp >= valid_start:
        return "validation"
    return "train"

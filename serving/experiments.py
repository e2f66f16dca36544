"""Online experiments: arms (a checkpoint and/or decoding settings) with traffic shares, read from one JSON
file, each request's arm chosen by a salted hash of its user id (sticky: a user stays in an arm while the
file's salt and shares stay), and the file re-read when it changes.

    {"name": "wide-beam", "salt": "2026-12-wide-beam",
     "arms": [{"name": "control", "share": 0.5},
              {"name": "beam8", "share": 0.5, "request": {"beam_size": 8}},
              {"name": "new-model", "share": 0.0, "checkpoint": "runs/candidate"}]}

An arm without "checkpoint" serves the server's own checkpoint. "request" overrides decoding settings of the
arm's requests (beam_size, temperature, top_k, top_p). Shares are in [0, 1] and sum to 1. A request without a
user id is assigned by its request id (so not sticky).
"""

from __future__ import annotations

import dataclasses
import json
import os

from homegen.serving.requests import PageRequest, RequestError, parse_request
from homegen.serving.traffic import salted_unit

OVERRIDABLE = ("beam_size", "temperature", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    share: float
    checkpoint: str | None = None  # None: the server's own
    request: tuple[tuple[str, object], ...] = ()  # decoding settings that override the request's


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    arms: tuple[Arm, ...]

    def assign(self, request: PageRequest) -> Arm:
        """The request's arm: by a salted hash of its user id (else its request id) into the shares."""
        unit = salted_unit(self.salt, request.user_id if request.user_id is not None else request.request_id or "")
        cumulative = 0.0
        for arm in self.arms:
            cumulative += arm.share
            if unit < cumulative:
                return arm
        return [arm for arm in self.arms if arm.share > 0][-1]  # unit within rounding of 1

    @staticmethod
    def apply(arm: Arm, request: PageRequest) -> PageRequest:
        """The request as the arm serves it."""
        return dataclasses.replace(request, **dict(arm.request)) if arm.request else request


def read_experiment(path: str) -> Experiment:
    """The experiment of a JSON file; ValueError names the file and what is wrong (nothing is half-read)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the experiment file ({e})") from None

    def refuse(reason: str) -> ValueError:
        return ValueError(f"{path}: {reason}")

    if not isinstance(obj, dict) or set(obj) - {"name", "salt", "arms"}:
        raise refuse('expected {"name": ..., "salt": ..., "arms": [...]} and nothing else')
    if not isinstance(obj.get("name"), str) or not isinstance(obj.get("salt"), str) or not obj["salt"]:
        raise refuse("'name' and a non-empty 'salt' must be strings")
    arms_in = obj.get("arms")
    if not isinstance(arms_in, list) or not arms_in:
        raise refuse("'arms' must be a non-empty list")
    arms = []
    for k, arm in enumerate(arms_in):
        if not isinstance(arm, dict) or set(arm) - {"name", "share", "checkpoint", "request"}:
            raise refuse(f"arms[{k}]: expected name, share and optionally checkpoint and request")
        name, share = arm.get("name"), arm.get("share")
        if not isinstance(name, str) or not name:
            raise refuse(f"arms[{k}]: 'name' must be a non-empty string")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise refuse(f"arm {name!r}: 'share' must be a number in [0, 1]")
        checkpoint = arm.get("checkpoint")
        if checkpoint is not None and (not isinstance(checkpoint, str) or not os.path.isdir(checkpoint)):
            raise refuse(f"arm {name!r}: checkpoint {checkpoint!r} is not a run folder")
        overrides = arm.get("request") or {}
        if not isinstance(overrides, dict) or set(overrides) - set(OVERRIDABLE):
            raise refuse(f"arm {name!r}: 'request' may set only {', '.join(OVERRIDABLE)}")
        try:
            parsed = parse_request({"user_id": "check", **overrides})
        except RequestError as e:
            raise refuse(f"arm {name!r}: {e}") from None
        arms.append(Arm(name, float(share), None if checkpoint is None else os.path.abspath(checkpoint),
                        tuple((key, getattr(parsed, key)) for key in overrides)))
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise refuse(f"arm names must differ, got {names}")
    total = sum(arm.share for arm in arms)
    if abs(total - 1.0) > 1e-9:
        raise refuse(f"the arms' shares sum to {total:g}, not 1")
    return Experiment(obj["name"], obj["salt"], tuple(arms))


class ExperimentFile:
    """The experiment of a file, re-read when the file changes (`refresh`); a changed file that does not
    read is refused and the experiment in force stays."""

    def __init__(self, path: str):
        self.path = path
        self.experiment = read_experiment(path)
        self._stamp = self._mtime()
        self.last_error: str | None = None

    def _mtime(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def changed(self) -> Experiment | None:
        """The file's new experiment when it changed since it was last read (None when it did not);
        ValueError when it changed and does not read (the next change is tried again)."""
        stamp = self._mtime()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        return read_experiment(self.path)

"""How traffic is split: a share of requests decoded by an exploring policy whose propensities are exact.

A request is chosen for exploration by a salted hash of its request id, independent of the user, the context
and the page, so the explored slice is a uniform random sample of the traffic; inside it the logging policy
is the sampler at `temperature` (and `top_p`), whose per-item probabilities the impression log records
exactly. Off-policy evaluation uses that slice (`decoding.exploration` in the logs): there the logging policy
is stochastic with known propensities, which the deterministic beam pages of the rest of the traffic are not.
"""

from __future__ import annotations

import dataclasses
import hashlib

from homegen.serving.requests import PageRequest


def salted_unit(salt: str, key: str) -> float:
    """A number in [0, 1) that depends only on (salt, key), uniform over keys."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class Exploration:
    share: float = 0.0  # of beam-search requests decoded by sampling instead
    temperature: float = 1.0
    top_p: float = 1.0
    salt: str = "homegen-explore"

    def __post_init__(self):
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"the exploration share must be in [0, 1], got {self.share}")
        if not (0.0 < self.temperature <= 100.0 and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"exploration needs a temperature in (0, 100] and top_p in (0, 1], got "
                             f"{self.temperature} and {self.top_p}")

    def apply(self, request: PageRequest) -> PageRequest:
        """The request as served: a beam-search request of one page (it needs a request id) falls in the
        exploration share with probability `share`, and is then sampled with a seed of its own; requests that
        ask for sampling or for several pages are served as asked."""
        if self.share <= 0 or request.temperature > 0 or request.num_pages > 1 or not request.request_id:
            return request
        if salted_unit(self.salt, request.request_id) >= self.share:
            return request
        seed = int(salted_unit(self.salt + "-seed", request.request_id) * 2**31)
        return dataclasses.replace(request, temperature=self.temperature, top_k=0, top_p=self.top_p, seed=seed,
                                   exploration=True)

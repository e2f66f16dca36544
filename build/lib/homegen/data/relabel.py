"""Training-time relabelings of logged pages: what the model is shown, not what was served.

- `with_outcome`: the page's bucketed total streams as the context field `outcome`, so a model learns what
  separates engaging pages from the logger's average one, and serving can ask for the best bucket.
- `streamed_first`: each shelf's streamed items moved to its front (most streams first, otherwise in
  logged order), so every generation step learns to continue with what users stream next, rather than
  with the logging policy's order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from homegen.data.formats import PageLog, Shelf

OUTCOME_FIELD = "outcome"  # context field holding a logged page's engagement (outcome-conditioned training)
OUTCOME_BUCKETS = ((0, "0"), (1, "1"), (2, "2"), (3, "3-4"), (5, "5+"))  # (lowest total streams, value)
BEST_OUTCOME = OUTCOME_BUCKETS[-1][1]


def with_outcome(log: PageLog) -> PageLog:
    """The log with its page's total streams, bucketed, as the context field `outcome`: a model trained on
    such logs learns what separates engaging pages from the rest, and is asked for the best bucket when
    it serves."""
    total = sum(sum(shelf.streams or []) for shelf in log.page)
    bucket = [value for low, value in OUTCOME_BUCKETS if total >= low][-1]
    return dataclasses.replace(log, context={**log.context, OUTCOME_FIELD: bucket})


def streamed_first(log: PageLog) -> PageLog:
    """The log with each shelf's items ordered by streams, descending (stable)."""
    shelves = []
    for shelf in log.page:
        if not shelf.streams:
            shelves.append(shelf)
            continue
        order = sorted(range(len(shelf.items)), key=lambda k: -shelf.streams[k])
        shelves.append(Shelf(shelf.shelf, [shelf.items[k] for k in order], [shelf.streams[k] for k in order]))
    return dataclasses.replace(log, page=shelves)


def relabeler(outcome: bool, order_by_streams: bool) -> Callable[[PageLog], PageLog]:
    """The configured relabelings, applied in turn."""
    steps = [f for f, on in ((with_outcome, outcome), (streamed_first, order_by_streams)) if on]

    def apply(log: PageLog) -> PageLog:
        for step in steps:
            log = step(log)
        return log

    return apply

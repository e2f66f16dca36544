"""homegen from Python: load a checkpoint, generate Home pages for requests, score given pages.

    import homegen

    model = homegen.load("runs/demo")
    [response] = model.generate([{"user_id": "u7", "history": ["t1", "t5"], "context": {"hour": 8}}])
    [scored] = model.score([{"user_id": "u7"}], [response["page"]])

Requests and responses are the dictionaries of FORMATS.md §4.
"""

from __future__ import annotations

from collections.abc import Sequence

from homegen.serving.engine import PageEngine
from homegen.serving.requests import PageRequest, parse_request


class PageModel:
    """One checkpoint, ready to generate and score pages (what serve.py runs, without a server)."""

    def __init__(self, engine: PageEngine):
        self.engine = engine

    @property
    def step(self) -> int:
        """The checkpoint step that was loaded."""
        return self.engine.step

    @property
    def shelves(self) -> list[str]:
        """The shelf types the model knows."""
        return list(self.engine.vocab.shelves)

    @property
    def items(self) -> list[str]:
        """The item ids the model knows."""
        return list(self.engine.vocab.items.item_ids)

    def generate(self, requests: Sequence[dict], objective: str | None = None) -> list[dict]:
        """One response per request (FORMATS.md §4): the best page, its log-probability and, with a value
        head and the `streams` objective, its predicted streams; `pages` too when a request asks for
        `num_pages` > 1. A request whose constraints no page can meet gets {"error": reason}; a malformed
        request raises `RequestError`. `objective` overrides the checkpoint's beam-search objective."""
        responses = self.engine.generate(_parsed(requests), objective=objective)
        for response in responses:
            response.pop("_stats", None)
        return responses

    def score(self, requests: Sequence[dict], pages: Sequence[list[dict]]) -> list[dict]:
        """Teacher-forced scores of given pages ([{"shelf", "items"}, ...]), one per request: each item's
        log-probability, the page's log-probability and, with a value head, each item's predicted stream
        probability and the page's predicted streams (see `PageEngine.score`)."""
        return self.engine.score(_parsed(requests), [list(page) for page in pages])


def _parsed(requests: Sequence[dict]) -> list[PageRequest]:
    if isinstance(requests, dict):
        raise TypeError("pass a list of requests, e.g. [request]")
    return [parse_request(r) for r in requests]


def load(checkpoint: str, step: int | None = None, objective: str = "auto") -> PageModel:
    """The pages model of a run folder (or its checkpoints/ folder), at `step` or the newest readable step.
    `objective`: what beam search maximises, `likelihood`, `streams` (needs a value head) or `auto`."""
    return PageModel(PageEngine(checkpoint, step, objective=objective))

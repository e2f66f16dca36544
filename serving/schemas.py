"""Request and response schemas of the HTTP API (FORMATS.md §4), from which /openapi.json is generated.
Validation itself is `serving/requests.py`'s, whose messages name the bad field."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from homegen.serving.requests import (
    MAX_BEAM,
    MAX_FAMILIARITY,
    MAX_IDS,
    MAX_INTENT,
    MAX_ITEMS_PER_SHELF,
    MAX_SHELVES,
    MAX_TEXT,
)


class SessionEvent(BaseModel):
    item: str = Field(max_length=MAX_TEXT)
    event: str = Field(description="stream, save (the item joins the history) or skip (the item is excluded); "
                                   "other events are ignored")


class PageRequestBody(BaseModel):
    """One Home page to generate. `user_id` or `history` is required."""

    user_id: str | None = Field(None, max_length=MAX_TEXT)
    request_id: str | None = Field(None, max_length=MAX_TEXT, description="echoed in the response and the impression "
                                                                        "log; the server assigns one when absent")
    history: list[str] = Field(default_factory=list, max_length=MAX_IDS,
                               description="item ids, oldest first; the newest max_history are used")
    context: dict[str, str | int | float] = Field(
        default_factory=dict, description=f"e.g. hour, device, and an optional free-text 'intent' (at most "
                                          f"{MAX_INTENT} characters; cut to what the model's rows hold)")
    num_shelves: int = Field(6, ge=1, le=MAX_SHELVES)
    min_items_per_shelf: int = Field(4, ge=1, le=MAX_ITEMS_PER_SHELF)
    max_items_per_shelf: int = Field(10, ge=1, le=MAX_ITEMS_PER_SHELF)
    exclude_items: list[str] = Field(default_factory=list, max_length=MAX_IDS)
    session: list[SessionEvent] = Field(default_factory=list, max_length=MAX_IDS,
                                        description="what the user did since the last page, oldest first")
    allowed_shelves: list[str] | None = None
    beam_size: int = Field(4, ge=1, le=MAX_BEAM, description="rounded up to the server's next beam size")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0: beam search; > 0: sampling")
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0)
    num_pages: int = Field(1, ge=1, le=MAX_BEAM)
    familiarity: float = Field(0.0, ge=-MAX_FAMILIARITY, le=MAX_FAMILIARITY,
                               description="added to the logit of every history item: > 0 favours what the user "
                                           "knows, < 0 discovery (checkpoints with one token per item)")


class ShelfOut(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a response carries these fields and no others

    shelf: str
    items: list[str]
    item_scores: list[float] = Field(description="each item's log-probability")
    propensities: list[float] | None = Field(
        None, description="each item's probability under the decoding policy given everything before it (1 for "
                          "beam search; absent for the best of several sampled pages)")


class PageOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    page: list[ShelfOut]
    log_prob: float
    log_propensity: float | None = None


class PageResponseBody(BaseModel):
    """What `PageEngine.generate` returns for a request it served (and /v1/pages answers)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(None, description="the request's own, or the one the server assigned")
    user_id: str | None
    page: list[ShelfOut]
    log_prob: float
    log_propensity: float | None = Field(None, description="log-probability of the whole page under the decoding "
                                                           "policy (FORMATS.md §3), when exact")
    experiment: str | None = Field(None, description="the experiment in force (serve.py --experiment)")
    arm: str | None = Field(None, description="the experiment arm that served the request")
    checkpoint_step: int = Field(description="the checkpoint step that generated this page")
    predicted_streams: float | None = Field(None, description="with the streams objective")
    pages: list[PageOut] | None = Field(None, description="when num_pages > 1, best first")


class ScoredShelf(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shelf: str
    items: list[str]
    item_scores: list[float] = Field(description="each item's log-probability where it stands")
    shelf_score: float = Field(description="the shelf token's log-probability")
    stream_probs: list[float] | None = Field(None, description="each item's predicted stream probability (value head)")


class ScoredPageBody(BaseModel):
    """What `PageEngine.score` returns for a page it scored (teacher-forced)."""

    model_config = ConfigDict(extra="forbid")

    page: list[ScoredShelf]
    log_prob: float = Field(description="the page's log-probability, EOS included")
    predicted_streams: float | None = Field(None, description="the sum of the page's stream_probs (value head)")


class OutcomeEvent(BaseModel):
    item: str
    event: str = Field(description="stream (counted in the page log's streams), skip or save")


class EventsBody(BaseModel):
    """What a user did with the page of one request (a list of such objects is accepted too)."""

    request_id: str = Field(description="the request_id of the page's response")
    events: list[OutcomeEvent] = Field(min_length=1)


class ErrorBody(BaseModel):
    error: str


class CatalogBody(BaseModel):
    catalog: str = Field(description="name of a FORMATS.md §2 catalog JSON Lines file inside the server's catalog "
                                     "directory (serve.py --catalog_dir); paths and names leading out of it are refused")


class ReloadBody(BaseModel):
    step: int | None = Field(None, description="checkpoint step of the same run (default: the newest readable)")

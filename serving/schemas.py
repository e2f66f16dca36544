"""Request and response schemas of the HTTP API (FORMATS.md §4), from which /openapi.json is generated.
Validation itself is `serving/requests.py`'s, whose messages name the bad field."""

from __future__ import annotations

from pydantic import BaseModel, Field

from homegen.serving.requests import MAX_BEAM, MAX_IDS, MAX_INTENT, MAX_ITEMS_PER_SHELF, MAX_SHELVES, MAX_TEXT


class SessionEvent(BaseModel):
    item: str = Field(max_length=MAX_TEXT)
    event: str = Field(description="stream, save (the item joins the history) or skip (the item is excluded); "
                                   "other events are ignored")


class PageRequestBody(BaseModel):
    """One Home page to generate. `user_id` or `history` is required."""

    user_id: str | None = Field(None, max_length=MAX_TEXT)
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


class ShelfOut(BaseModel):
    shelf: str
    items: list[str]
    item_scores: list[float] = Field(description="each item's log-probability")


class PageOut(BaseModel):
    page: list[ShelfOut]
    log_prob: float


class PageResponseBody(BaseModel):
    user_id: str | None
    page: list[ShelfOut]
    log_prob: float
    checkpoint_step: int = Field(description="the checkpoint step that generated this page")
    predicted_streams: float | None = Field(None, description="with the streams objective")
    pages: list[PageOut] | None = Field(None, description="when num_pages > 1, best first")


class ErrorBody(BaseModel):
    error: str


class CatalogBody(BaseModel):
    catalog: str = Field(description="name of a FORMATS.md §2 catalog JSON Lines file inside the server's catalog "
                                     "directory (serve.py --catalog_dir); paths and names leading out of it are refused")


class ReloadBody(BaseModel):
    step: int | None = Field(None, description="checkpoint step of the same run (default: the newest readable)")

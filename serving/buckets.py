"""The decoding shapes a server compiles at start-up, so that no request waits for a compile.

A request is served in one of a few fixed shapes: its beam size (or, when sampling, its number of pages) is
rounded up to the next of `beam_sizes` (`sample_widths`), its batch is padded to the next of `rows`, every
prompt to one length (the longest history and context plus `intent_tokens` intent pieces) and its page
buffer to the first of `page_shapes` (shelves, items per shelf) that holds its page. A decoding step attends
to every slot of its buffers, so a page buffer sized for the longest page the server allows makes every
shorter page pay for it (6 x 10 pages took 1.55x as long in a 10 x 20 buffer, on a 4.6 M-parameter model);
a smaller page shape beside the largest one is the remedy, at the price of compiling each shape once more.
What cannot be rounded (more shelves, longer shelves or more exclusions than the server allows, a beam
wider than the widest) is refused with a reason.
"""

from __future__ import annotations

import dataclasses

from homegen.serving.requests import PageRequest, RequestError


def smallest_at_least(sizes: tuple[int, ...], n: int) -> int:
    """The first of `sizes` (ascending) that is >= n."""
    return next(size for size in sizes if size >= n)


@dataclasses.dataclass(frozen=True)
class ShapeBuckets:
    rows: tuple[int, ...] = (1, 4, 16)  # batch sizes; the last is the server's largest batch
    beam_sizes: tuple[int, ...] = (1, 2, 4, 8)
    sample_widths: tuple[int, ...] = (1, 4)  # pages sampled per request (num_pages rounded up)
    # Page buffers (shelves, items per shelf), smallest first; the last is the largest page a request may ask for.
    page_shapes: tuple[tuple[int, int], ...] = ((10, 20),)
    index_width: int = 1024  # exclusions a request may list; history-dependent eligibility pairs kept
    intent_tokens: int = 64  # intent pieces the prompt buffer holds beside the longest history (the rest is cut)

    def __post_init__(self):
        for name in ("rows", "beam_sizes", "sample_widths"):
            sizes = getattr(self, name)
            if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
                raise ValueError(f"{name} must be increasing positive sizes, got {sizes}")
        if self.intent_tokens < 0:
            raise ValueError(f"intent_tokens must be >= 0, got {self.intent_tokens}")
        shapes = self.page_shapes
        if not shapes or len(set(shapes)) != len(shapes) or min(min(s) for s in shapes) < 1:
            raise ValueError(f"page_shapes must be distinct positive (shelves, items per shelf), got {shapes}")
        if any(s > shapes[-1][0] or i > shapes[-1][1] for s, i in shapes):
            raise ValueError(f"the last page shape must hold every other (it is the largest page allowed), got {shapes}")

    @property
    def max_batch(self) -> int:
        return self.rows[-1]

    @property
    def max_shelves(self) -> int:
        return self.page_shapes[-1][0]

    @property
    def max_items_per_shelf(self) -> int:
        return self.page_shapes[-1][1]

    def page_shape(self, request: PageRequest) -> tuple[int, int]:
        """The first page buffer that holds the (fitted) request's page."""
        return next(shape for shape in self.page_shapes
                    if request.num_shelves <= shape[0] and request.max_items_per_shelf <= shape[1])

    def fit(self, request: PageRequest) -> PageRequest:
        """The request in this server's shapes (beam size rounded up), or RequestError saying what is over."""
        limits = (("num_shelves", request.num_shelves, self.max_shelves),
                  ("max_items_per_shelf", request.max_items_per_shelf, self.max_items_per_shelf),
                  ("exclude_items", len(request.exclude_items), self.index_width))
        for name, value, limit in limits:
            if value > limit:
                raise RequestError(f"'{name}' is {value}; this server allows at most {limit}")
        if request.temperature == 0:
            if request.beam_size > self.beam_sizes[-1]:
                raise RequestError(f"'beam_size' is {request.beam_size}; this server allows at most "
                                   f"{self.beam_sizes[-1]}")
            return dataclasses.replace(request, beam_size=smallest_at_least(self.beam_sizes, request.beam_size))
        if request.num_pages > self.sample_widths[-1]:
            raise RequestError(f"'num_pages' is {request.num_pages}; this server samples at most "
                               f"{self.sample_widths[-1]}")
        return request

    def width(self, request: PageRequest) -> int:
        """Beams, or sampled pages, that a (fitted) request decodes."""
        if request.temperature == 0:
            return request.beam_size
        return smallest_at_least(self.sample_widths, request.num_pages)

    def shapes(self) -> list[tuple[str, int, int, tuple[int, int]]]:
        """Every (mode, width, rows, page shape) the server compiles at start-up."""
        widths = [("beam", w) for w in self.beam_sizes] + [("sample", w) for w in self.sample_widths]
        return [(mode, w, r, page) for mode, w in widths for r in self.rows for page in self.page_shapes]

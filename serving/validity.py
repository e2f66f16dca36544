"""Checks a served page against every rule of the grammar and of its request."""

from __future__ import annotations

from serving.requests import PageRequest


def page_violations(engine, request: PageRequest, page: list[dict]) -> list[str]:
    """The rules `page` breaks (empty when valid): shelf count, shelf allow-list, repeated shelves, items
    per shelf, unknown or ineligible items, exclusions, duplicate items."""
    vocab, problems = engine.vocab, []
    eligible = engine.eligibility.matrix(request.history)
    shelves = [s["shelf"] for s in page]
    if not 1 <= len(shelves) <= request.num_shelves:
        problems.append(f"{len(shelves)} shelves (allowed 1..{request.num_shelves})")
    if len(set(shelves)) != len(shelves):
        problems.append("a shelf type repeats")
    seen: set[str] = set()
    for shelf in page:
        name, items = shelf["shelf"], shelf["items"]
        if name not in vocab.shelves:
            problems.append(f"unknown shelf {name}")
            continue
        if request.allowed_shelves is not None and name not in request.allowed_shelves:
            problems.append(f"shelf {name} not allowed")
        if not request.min_items_per_shelf <= len(items) <= request.max_items_per_shelf:
            problems.append(f"shelf {name} has {len(items)} items")
        row = vocab.shelves.index(name)
        for item in items:
            code = vocab.items.encode(item)
            if code is None or not eligible[row, code[0]]:
                problems.append(f"item {item} not eligible for {name}")
            if item in request.exclude_items:
                problems.append(f"excluded item {item}")
            if item in seen:
                problems.append(f"item {item} twice")
            seen.add(item)
    return problems

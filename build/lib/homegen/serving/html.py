"""The HTML view of a page: a form, and shelves as rows of cards."""

from __future__ import annotations

import html

from homegen.data.simulator.shelves import SHELF_TITLES

STYLE = """
body{font-family:system-ui,sans-serif;background:#121212;color:#eee;margin:24px}
form{display:flex;gap:8px;flex-wrap:wrap;margin-bottom:24px}
input,select,button{padding:6px;border-radius:6px;border:1px solid #444;background:#222;color:#eee}
.shelf{margin-bottom:20px}.shelf h2{font-size:18px;margin:8px 0}
.row{display:flex;gap:12px;overflow-x:auto}
.card{min-width:140px;max-width:140px;background:#1f1f1f;border-radius:8px;padding:10px}
.cover{height:100px;border-radius:6px;margin-bottom:8px}
.title{font-weight:600;font-size:14px}.artist{color:#aaa;font-size:12px}.error{color:#f66}
"""


def _cover_color(item_id: str) -> str:
    return f"hsl({sum(map(ord, item_id)) * 37 % 360},45%,35%)"


def render(form: dict[str, str], response: dict | None, describe) -> str:
    """The whole HTML document: the form filled with `form`, then the page (or error) if any."""
    def field(name, label, width=120):
        value = html.escape(form.get(name, ""), quote=True)
        return f'<label>{label} <input name="{name}" value="{value}" style="width:{width}px"></label>'

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>homegen</title>",
             f"<style>{STYLE}</style></head><body><h1>homegen</h1><form method='get' action='/'>",
             field("user_id", "user"), field("history", "history (ids, comma-separated)", 260),
             field("intent", "intent", 200), field("hour", "hour", 50), field("device", "device", 80),
             field("num_shelves", "shelves", 40), "<button type='submit'>Generate</button></form>"]
    if response is not None and "error" in response:
        parts.append(f"<p class='error'>{html.escape(response['error'])}</p>")
    elif response is not None:
        for shelf in response["page"]:
            title = SHELF_TITLES.get(shelf["shelf"], shelf["shelf"].replace("_", " ").capitalize())
            cards = []
            for item in shelf["items"]:
                info = describe(item)
                cards.append(f"<div class='card' data-item='{html.escape(item, quote=True)}'>"
                             f"<div class='cover' style='background:{_cover_color(item)}'></div>"
                             f"<div class='title'>{html.escape(info.get('title') or item)}</div>"
                             f"<div class='artist'>{html.escape(info.get('artist') or '')}</div></div>")
            parts.append(f"<section class='shelf' data-shelf='{html.escape(shelf['shelf'], quote=True)}'>"
                         f"<h2>{html.escape(title)}</h2><div class='row'>{''.join(cards)}</div></section>")
    parts.append("</body></html>")
    return "".join(parts)

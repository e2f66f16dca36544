"""Page-log counts (data/log_counts.py): counted per part and merged in order, they equal the counts of the whole
log read at once, survive JSON, and give the vocabulary builder what relabeled pages would give it."""

import json
import random

import pytest

from homegen.data import vocab as vocab_module
from homegen.data.formats import CatalogItem, PageLog, Shelf
from homegen.data.log_counts import LogCounts
from homegen.data.relabel import relabeler
from homegen.data.vocab import VocabularyBuilder


def _logs(n: int, seed: int = 0) -> list[PageLog]:
    """Pages with repeated and new items, shelves and intents (one intent equal to a shelf's name), and a few
    pages that log the relabeled fields themselves."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        context = {"device": rng.choice(["phone", "tv"]), "hour": str(rng.randrange(24))}
        if k % 7 == 0:
            context["outcome"] = "logged"
        if k % 11 == 0:
            context["user_id"] = "someone_else"
        page = [Shelf(rng.choice(["made_for_you", "new_releases", f"because_{k % 5}"]),
                      [f"t{rng.randrange(40)}" for _ in range(3)], [float(rng.randrange(3)) for _ in range(3)])
                for _ in range(2)]
        intent = rng.choice([None, "calm piano", f"mood {k % 9}", "made for you"])
        out.append(PageLog(f"u{k % 13}", page, context=context, intent=intent,
                           history=[f"h{rng.randrange(60)}" for _ in range(2)]))
    return out


def test_counts_merged_in_order_equal_the_whole_logs_counts_and_survive_json(monkeypatch):
    monkeypatch.setattr(vocab_module, "MAX_INTENTS", 6)  # the cap on intents is reached within the second part
    logs = _logs(120)
    whole = LogCounts()
    for log in logs:
        whole.add_page(log)
    merged = LogCounts()
    for start, end in ((0, 17), (17, 64), (64, 120)):
        part = LogCounts()
        for log in logs[start:end]:
            part.add_page(log)
        merged.merge(LogCounts.from_json(json.loads(json.dumps(part.to_json()))))
    assert merged.to_json() == whole.to_json()
    assert len(whole.pages.intents) == 6 and len(whole.pages.shelves) == 7


@pytest.mark.parametrize("outcome, user", [(False, False), (True, False), (False, True), (True, True)])
def test_counts_give_the_builder_what_the_relabeled_pages_give_it(outcome, user):
    """What training's vocabulary pass did page by page (relabel, then add) equals counting once and adding
    the counts with the config's relabelings, the catalog first in both."""
    logs = _logs(80, seed=1)
    catalog = [CatalogItem(f"t{k}", f"title {k}") for k in range(0, 50, 3)]
    label = relabeler(outcome, False, user)
    direct = VocabularyBuilder(min_context_count=2)
    direct.add_catalog(catalog)
    for log in logs:
        direct.add_page(label(log))
    counts = LogCounts()
    for log in logs:
        counts.add_page(log)
    built = VocabularyBuilder(min_context_count=2)
    built.add_catalog(catalog)
    counts.add_to(built, outcome, user)
    assert built.context == direct.context and list(built.items) == list(direct.items)
    assert list(built.shelves) == list(direct.shelves) and built.text == direct.text
    assert built.text.count("made for you") == 2  # an intent, and a shelf's name
    assert any(t.startswith("outcome=") for t in built.context)  # some pages log the field themselves
    assert ("user_id=u3" in built.context) == user and ("outcome=5+" in built.context) == outcome
    assert built.build(sentencepiece_vocab=60).to_json() == direct.build(sentencepiece_vocab=60).to_json()


def test_a_builder_that_read_a_catalog_does_not_merge_and_bad_counts_name_their_file(tmp_path):
    with_catalog = VocabularyBuilder()
    with_catalog.add_catalog([CatalogItem("t1", "a title")])
    with pytest.raises(ValueError, match="page logs only"):
        VocabularyBuilder().merge(with_catalog)
    path = tmp_path / "log_counts.json"
    path.write_text('{"version": 1, "items": []}')
    with pytest.raises(ValueError, match="log_counts.json: not page-log counts"):
        LogCounts.load(str(path))
    path.write_text('{"version": 99}')
    with pytest.raises(ValueError, match="of format 99"):
        LogCounts.load(str(path))

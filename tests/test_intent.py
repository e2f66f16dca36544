"""Intent following, measured: an intent changes the page, the page profile against hand-computed values, and
the intent table's rows on the tiny checkpoint (the oracle gains from knowing the intent)."""

from __future__ import annotations

import numpy as np
import pytest

from homegen.data.simulator.world import GENRES, INTENTS, MOODS, World, WorldConfig
from homegen.evaluation.intent import PARAPHRASES, WORDINGS, intent_table, profile, with_intents
from homegen.serving.requests import parse_request


def test_every_intent_has_one_paraphrase_in_other_words():
    assert len(PARAPHRASES) == len(INTENTS)
    for (text, *_), paraphrase in zip(INTENTS, PARAPHRASES):
        assert paraphrase != text and not paraphrase.endswith(text)  # the world would not know it as a wording


def test_profile_matches_hand_computed_shares():
    world = World(WorldConfig(num_items=200, num_users=10))
    k = next(k for k, (_, _, genre, _) in enumerate(INTENTS) if genre)  # an intent that names a genre
    _, mood, genre, energy = INTENTS[k]
    items = [3, 17, 42, 99]
    page = [{"shelf": "any", "items": [world.catalog.item_id(i) for i in items[:2]]},
            {"shelf": "other", "items": [world.catalog.item_id(i) for i in items[2:]]}]
    shares = profile(world, [page], np.array([k]))
    c = world.catalog
    assert shares["mood_share"][0] == pytest.approx(np.mean([c.mood[i] == MOODS.index(mood) for i in items]))
    assert shares["genre_share"][0] == pytest.approx(np.mean([c.genre[i] == GENRES.index(genre) for i in items]))
    assert shares["energy_gap"][0] == pytest.approx(np.mean([abs(c.energy[i] - energy) for i in items]))
    assert np.isnan(profile(world, [page], np.array([0]))["genre_share"][0])  # "calm music for studying": no genre


def test_with_intents_cycles_the_intents_and_drops_a_logged_one():
    requests = [{"user_id": f"u{k}", "context": {"hour": 3, "intent": "workout energy"}} for k in range(14)]
    assigned = with_intents(requests)
    assert [k for k, _ in assigned] == [*range(12), 0, 1]
    assert all(r["context"] == {"hour": 3} for _, r in assigned)


@pytest.mark.slow
def test_an_intent_changes_the_page_and_the_table_has_every_row(tiny_checkpoint):
    from homegen.serving.engine import PageEngine

    engine = PageEngine(tiny_checkpoint)
    plain = parse_request({"user_id": "u1", "num_shelves": 3})
    with_intent = parse_request({"user_id": "u1", "num_shelves": 3, "context": {"intent": "heavy and dark"}})
    assert engine.generate([plain])[0]["page"] != engine.generate([with_intent])[0]["page"]
    requests = [{"user_id": f"u{k}", "num_shelves": 2, "max_items_per_shelf": 4} for k in range(12)]
    rows = {r["pages"]: r for r in intent_table(engine, requests, beam_size=2)}
    assert set(rows) == {*WORDINGS, "oracle, no intent", "oracle, intent"}
    assert rows["no intent"]["gain"] == 0.0
    # The oracle that knows the intent earns more under it, and its pages move toward the intent's mood.
    assert rows["oracle, intent"]["gain"] > 3 * rows["oracle, intent"]["gain_se"] > 0
    assert rows["oracle, intent"]["mood_share"] > rows["oracle, no intent"]["mood_share"]

"""Whether pages follow a request's free-text intent, measured in the synthetic world.

Every request of a split is asked three ways: without an intent, with an intent in one of the world's own
wordings (the texts its logs carry, so seen in training), and with a paraphrase of the same intent written for
this benchmark (never in any log: an unseen wording). All three pages are judged under the world's true response
model for the user *with* the intent (the need the request expresses), so the paired difference against the
page without an intent is what following the intent earns. The oracle's page for the context with the intent,
and for the context without it, give the same gain for a policy that knows the world. Each page is also
profiled against the intent: the share of its items in the intent's mood, in its genre (intents that name
one) and the mean distance of their energy from the intent's target.
"""

from __future__ import annotations

import numpy as np

from homegen.data.simulator.policies import OraclePolicy
from homegen.data.simulator.world import GENRES, INTENTS, MOODS, World
from homegen.evaluation.pages import WorldJudge, standard_error
from homegen.serving.engine import PageEngine
from homegen.serving.requests import parse_request

# One paraphrase per world intent (same order as INTENTS), sharing as few words with it as reads naturally.
PARAPHRASES = (
    "quiet songs to study to",
    "classical pieces to concentrate",
    "high energy tracks for the gym",
    "songs for a house party",
    "melancholy tunes for a grey afternoon",
    "some jazz with our evening meal",
    "soft lullabies for sleeping",
    "cheerful songs for my drive to the office",
    "brutal metal, pitch black",
    "country songs to belt out in the car",
    "electronic beats after midnight",
    "reggaeton and salsa for dancing",
)
WORDINGS = ("no intent", "intent, seen wording", "intent, unseen paraphrase")


def with_intents(requests: list[dict]) -> list[tuple[int, dict]]:
    """Each request with an intent assigned in turn (request k gets intent k mod 12): (intent index, request
    without any intent)."""
    return [(k % len(INTENTS), {**r, "context": {c: v for c, v in r.get("context", {}).items() if c != "intent"}})
            for k, r in enumerate(requests)]


def profile(world: World, pages: list[list[dict]], intents: np.ndarray) -> dict[str, np.ndarray]:
    """Per page: the share of its items in the intent's mood and genre (NaN for an intent without a genre),
    and the mean |energy - the intent's target energy|."""
    catalog = world.catalog
    rows = {"mood_share": [], "genre_share": [], "energy_gap": []}
    for page, k in zip(pages, intents):
        _, mood, genre, energy = INTENTS[k]
        index = np.array([world.item_index(i) for shelf in page for i in shelf["items"]], np.int64)
        rows["mood_share"].append(np.mean(catalog.mood[index] == MOODS.index(mood)))
        rows["genre_share"].append(np.mean(catalog.genre[index] == GENRES.index(genre)) if genre else np.nan)
        rows["energy_gap"].append(np.mean(np.abs(catalog.energy[index] - energy)))
    return {name: np.array(values) for name, values in rows.items()}


def intent_table(engine: PageEngine, requests: list[dict], beam_size: int = 4) -> list[dict]:
    """One row per wording (and the oracle's two pages): expected streams under the intent, the paired gain
    over the page without an intent (mean and standard error), and the page's profile. The requests share one
    page shape and ask for full shelves, as the oracle's pages have them."""
    world, cfg = engine.world, engine.world.config
    shapes = {(r.get("num_shelves", cfg.num_shelves), r.get("max_items_per_shelf", cfg.max_items)) for r in requests}
    if len(shapes) != 1:
        raise ValueError(f"the requests must share one page shape (the oracle builds one), got {sorted(shapes)}")
    (num_shelves, max_items), = shapes
    assigned = with_intents([{**r, "min_items_per_shelf": r.get("max_items_per_shelf", cfg.max_items),
                              "beam_size": beam_size} for r in requests])
    intents = np.array([k for k, _ in assigned])
    texts = {WORDINGS[1]: [INTENTS[k][0] for k in intents], WORDINGS[2]: [PARAPHRASES[k] for k in intents]}
    asked = {WORDINGS[0]: [r for _, r in assigned]}
    for wording, intent_texts in texts.items():
        asked[wording] = [{**r, "context": {**r.get("context", {}), "intent": t}} for (_, r), t in zip(assigned, intent_texts)]
    pages = {}
    for wording, batch in asked.items():
        responses = engine.generate([parse_request(r) for r in batch])
        failed = [resp for resp in responses if "error" in resp]
        if failed:
            raise RuntimeError(f"{len(failed)} request(s) could not be served ({wording}): {failed[0]['error']}")
        pages[wording] = [resp["page"] for resp in responses]
    judge = WorldJudge(world, asked[WORDINGS[1]], engine.shelf_rules)  # the user's need: with the intent
    values = {w: judge.slot_probabilities(p).sum(axis=(1, 2)) for w, p in pages.items()}
    oracle = OraclePolicy(judge.response)
    without = WorldJudge(world, asked[WORDINGS[0]], engine.shelf_rules)
    oracle_pages = {"oracle, no intent": oracle.build(judge.users, without.contexts, judge.history, num_shelves, max_items),
                    "oracle, intent": oracle.build(judge.users, judge.contexts, judge.history, num_shelves, max_items)}
    for name, (shelves, items) in oracle_pages.items():
        values[name] = judge.response.expected_engagement(judge.batch(shelves, items))
        pages[name] = [[{"items": [world.catalog.item_id(i) for i in row if i >= 0]} for row in page] for page in items]
    rows = []
    for name, v in values.items():
        base = values["oracle, no intent" if name.startswith("oracle") else WORDINGS[0]]
        gain = v - base
        shares = profile(world, pages[name], intents)
        rows.append({"pages": name, "expected_streams": float(v.mean()), "se": standard_error(v),
                     "gain": float(gain.mean()), "gain_se": standard_error(gain),
                     **{m: float(np.nanmean(s)) for m, s in shares.items()}})
    return rows

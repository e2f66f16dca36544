"""Last.fm as page data: the converter on a hand-written excerpt (ids, dates, the cut-off, disjoint splits), the
page metric against hand-computed values, the baselines' page rules, bad files, and the real files' split."""

from __future__ import annotations

import json
import math
import os

import pytest

from homegen.data.formats import DataFormatError
from homegen.data.lastfm import build, parse_month, read_lastfm
from homegen.evaluation.lastfm import POPULAR, LogStatistics, ThemeThenArtist, ideal_dcg, judge
from scripts import lastfm_pages
from tests.conftest import shared_file

# Users 1-4; tags 1 "Rock", 2 "chill out" (ISO-8859-1 file), 3 "jazz" (used once: not a theme with themes=2).
TAGGED = [  # user, artist, tag, day, month, year
    (1, 10, 1, 1, 3, 2010), (1, 11, 1, 1, 3, 2010), (1, 12, 2, 1, 3, 2010), (1, 13, 2, 1, 5, 2010),
    (2, 10, 1, 1, 4, 2010), (2, 12, 2, 1, 4, 2010), (2, 14, 3, 1, 4, 2010),
    (1, 14, 1, 1, 8, 2010), (1, 12, 1, 1, 9, 2010), (1, 14, 3, 1, 9, 2010),  # after the cut-off
    (3, 11, 2, 1, 8, 2010), (4, 10, 2, 1, 1, 2011), (4, 99, 1, 1, 1, 2011),  # 99: never played or tagged before
]
PLAYS = [(1, 12, 500), (1, 10, 100), (1, 13, 50), (2, 14, 10), (3, 10, 7), (4, 11, 3)]


def write_excerpt(folder, tagged=TAGGED, artists_bytes: bytes | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    rows = lambda header, rows: "\r\n".join([header] + ["\t".join(map(str, r)) for r in rows]) + "\r\n"  # noqa: E731
    with open(os.path.join(folder, "user_taggedartists.dat"), "w", newline="") as f:
        f.write(rows("userID\tartistID\ttagID\tday\tmonth\tyear", tagged))
    with open(os.path.join(folder, "user_artists.dat"), "w", newline="") as f:
        f.write(rows("userID\tartistID\tweight", PLAYS))
    with open(os.path.join(folder, "tags.dat"), "wb") as f:
        f.write("tagID\ttagValue\r\n1\tRock\r\n2\tchill out\r\n3\tjazz é\r\n".encode("iso-8859-1"))
    with open(os.path.join(folder, "artists.dat"), "wb") as f:
        f.write(artists_bytes or "id\tname\turl\tpictureURL\n10\tBjörk\tu\tp\n11\tMuse\tu\tp\n".encode("utf-8"))
    return str(folder)


def test_converter_keeps_the_future_out_of_training_and_splits_users(tmp_path):
    data = read_lastfm(write_excerpt(tmp_path / "lastfm"))
    assert data.tag_names["3"] == "jazz é" and data.artist_names["10"] == "Björk"
    built = build(data, parse_month("2010-08"), themes=2, num_shelves=2, items_per_shelf=2, seed=0)
    assert built.summary["themes"] == ["rock", "chill_out"]  # 3 uses each before the cut-off: the lower tag id first
    # One page per user and month before the cut-off; shelves largest first, artists most played first.
    months = {(p["user_id"], p["timestamp"]) for p in built.pages}
    assert months == {("u1", 1267401600), ("u1", 1272672000), ("u2", 1270080000)}  # 2010-03, 2010-05, 2010-04
    march = next(p for p in built.pages if p["request_id"] == "lastfm-1-2010-03-0")
    assert march["page"] == [{"shelf": "rock", "items": ["a10", "a11"], "streams": [1, 1]},
                             {"shelf": "chill_out", "items": ["a12"], "streams": [1]}]
    # History: most played (least of them first), then what was tagged before the month, latest last.
    may = next(p for p in built.pages if p["request_id"] == "lastfm-1-2010-05-0")
    assert may["history"] == ["a13", "a10", "a11", "a12"]
    # Nothing from after the cut-off reaches training: not the pairs, not the catalog's themes.
    trained = {(s["shelf"], i) for p in built.pages for s in p["page"] for i in s["items"]}
    assert ("rock", "a14") not in trained and ("rock", "a12") not in trained
    catalog = {c["item_id"]: c for c in built.catalog}
    assert catalog["a12"]["genres"] == ["chill_out"] and catalog["a10"]["title"] == "Björk"
    assert "a99" not in catalog  # first seen after the cut-off: not in the catalog, not held out
    # Held out: the theme pairs tagged after the cut-off, per user; jazz is not a theme.
    heldout = {h["user_id"]: h["pairs"] for split in built.heldout.values() for h in split}
    assert heldout == {"u1": [["rock", "a14"], ["rock", "a12"]], "u3": [["chill_out", "a11"]],
                       "u4": [["chill_out", "a10"]]}
    users = {split: {r["user_id"] for r in requests} for split, requests in built.requests.items()}
    assert users["validation"].isdisjoint(users["test"]) and users["validation"] | users["test"] == set(heldout)
    request = next(r for split in built.requests.values() for r in split if r["user_id"] == "u1")
    assert request["history"] == ["a10", "a11", "a12", "a13"]  # as of the cut-off: a13 tagged in May, last
    assert request["min_items_per_shelf"] == request["max_items_per_shelf"] == 2


def test_pair_ndcg_and_the_other_metrics_match_hand_computed_values():
    pairs = [("rock", "a1"), ("rock", "a2"), ("rock", "a3"), ("pop", "a4")]
    page = [{"shelf": "jazz", "items": ["a1", "a9"]},  # a1 on the wrong shelf: an artist hit, not a pair hit
            {"shelf": "rock", "items": ["a8", "a2"]},  # row 1, column 1
            {"shelf": "pop", "items": ["a4", "a7"]}]  # row 2, column 0
    dcg = 1 / (math.log2(3) * math.log2(3)) + 1 / (math.log2(4) * math.log2(2))
    # Ideal for 3 shelves of 2: rock's two best slots on row 0, pop's one on row 1.
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(3)
    assert ideal_dcg(pairs, 3, 2) == pytest.approx(ideal)
    scores = judge(page, pairs, 3, 2)
    assert scores["pair_ndcg"] == pytest.approx(dcg / ideal)
    assert scores["artist_recall"] == pytest.approx(3 / 4)  # a1, a2, a4 of the 4 held-out artists
    assert scores["theme_coverage"] == pytest.approx(2 / 2)  # both held-out themes are shelves
    perfect = [{"shelf": "rock", "items": ["a1", "a2"]}, {"shelf": "pop", "items": ["a4", "a3"]}, {"shelf": "x", "items": []}]
    assert judge(perfect, pairs, 3, 2)["pair_ndcg"] == pytest.approx(1.0)


def test_baselines_keep_the_page_rules(tmp_path):
    built = build(read_lastfm(write_excerpt(tmp_path / "lastfm")), parse_month("2010-08"), themes=2, num_shelves=2,
                  items_per_shelf=2)
    stats = LogStatistics.from_pages(built.pages)
    requests = [r for split in built.requests.values() for r in split]
    eligible = {(s["shelf"], i) for p in built.pages for s in p["page"] for i in s["items"]}
    for policy in (POPULAR, ThemeThenArtist(theme_prior=0.1, neighbours=1.0, own=3.0)):
        for page in policy.pages(stats, requests):
            items = [i for s in page for i in s["items"]]
            assert len(items) == len(set(items)) and len(page) == 2
            assert all((s["shelf"], i) in eligible for s in page for i in s["items"])
    # The user's own artists first, the later in the history the earlier on the shelf (u1: a10 a11 a12 a13).
    u1 = next(r for r in requests if r["user_id"] == "u1")
    own = ThemeThenArtist(theme_prior=0.0, own=100.0).pages(stats, [u1])[0]
    assert own == [{"shelf": "chill_out", "items": ["a13", "a12"]}, {"shelf": "rock", "items": ["a11", "a10"]}]


@pytest.mark.parametrize("tagged, artists, message", [
    ([(1, 10, 1, 1, 3)], None, "user_taggedartists.dat:2: expected 6 tab-separated columns"),
    ([(1, 10, 1, 1, 13, 2010)], None, "user_taggedartists.dat:2: bad date 2010-13-1"),
    ([(1, "x", 1, 1, 3, 2010)], None, "user_taggedartists.dat:2: artistID must be an integer"),
    (TAGGED, b"id\tname\turl\tpictureURL\n10\tBj\xf6rk\tu\tp\n", "artists.dat:2: not UTF-8 text"),
])
def test_a_bad_file_is_one_line_naming_file_and_line(tmp_path, capsys, tagged, artists, message):
    folder = write_excerpt(tmp_path / "lastfm", tagged=tagged, artists_bytes=artists)
    with pytest.raises(DataFormatError, match=message):
        read_lastfm(folder)
    assert lastfm_pages.main(["convert", "--data", folder, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_the_real_files_convert_into_disjoint_validation_and_test_users(tmp_path, capsys):
    folder = os.path.dirname(shared_file("lastfm-hetrec2011", "user_taggedartists.dat"))
    assert lastfm_pages.main(["convert", "--data", folder, "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["validation_users"] == summary["test_users"] == 271
    assert summary["assignments_before"] + summary["assignments_after"] == 186479
    splits = {s: {json.loads(line)["user_id"] for line in open(tmp_path / f"requests_{s}.jsonl")}
              for s in ("validation", "test")}
    assert splits["validation"].isdisjoint(splits["test"])
    assert lastfm_pages.main(["benchmark", "--out", str(tmp_path), "--split", "validation"]) == 0
    assert "theme-then-artist" in capsys.readouterr().out


def test_training_pages_can_gather_several_months_without_crossing_the_cutoff(tmp_path):
    data = read_lastfm(write_excerpt(tmp_path / "lastfm"))
    built = build(data, parse_month("2010-08"), themes=2, page_months=6)  # one window: 2010-02 to 2010-07
    u1 = [p for p in built.pages if p["user_id"] == "u1"]
    assert [p["request_id"] for p in u1] == ["lastfm-1-2010-02-0"]
    assert u1[0]["page"] == [{"shelf": "rock", "items": ["a10", "a11"], "streams": [1, 1]},
                             {"shelf": "chill_out", "items": ["a12", "a13"], "streams": [1, 1]}]
    assert u1[0]["history"] == ["a13", "a10", "a12"]  # as of the window's first month: only the most played
    assert built.heldout == build(data, parse_month("2010-08"), themes=2).heldout  # what is judged is unchanged
    with pytest.raises(ValueError, match="page_months"):
        build(data, parse_month("2010-08"), page_months=0)


def test_overlapping_windows_give_a_page_for_every_window_that_holds_an_assignment(tmp_path):
    """6-month windows ending every month before the cut-off: u1's March tags fall in the 5 windows starting
    2009-10 to 2010-02, its May tag in the last 3; each window's history is as of its first month."""
    data = read_lastfm(write_excerpt(tmp_path / "lastfm"))
    built = build(data, parse_month("2010-08"), themes=2, page_months=6, page_stride=1)
    u1 = [p for p in built.pages if p["user_id"] == "u1"]
    assert [p["request_id"] for p in u1] == [f"lastfm-1-{m}-0" for m in
                                             ("2009-10", "2009-11", "2009-12", "2010-01", "2010-02")]
    march_only = [{"shelf": "rock", "items": ["a10", "a11"], "streams": [1, 1]},
                  {"shelf": "chill_out", "items": ["a12"], "streams": [1]}]
    assert u1[0]["page"] == u1[1]["page"] == march_only
    gathered = build(data, parse_month("2010-08"), themes=2, page_months=6)
    assert u1[2]["page"] == u1[4]["page"] == gathered.pages[0]["page"]  # March and May
    assert all(p["history"] == ["a13", "a10", "a12"] for p in u1)  # nothing tagged before 2010-02
    assert built.heldout == gathered.heldout
    with pytest.raises(ValueError, match="page_stride"):
        build(data, parse_month("2010-08"), page_months=6, page_stride=7)


def test_intents_the_users_later_theme_and_how_a_page_answers_it(tmp_path):
    from homegen.evaluation.lastfm import intent_theme, judge_intent

    pairs = [("pop", "a1"), ("rock", "a2"), ("rock", "a3"), ("pop", "a4")]
    assert intent_theme(pairs, ["rock", "pop"]) == "rock"  # a tie: the more used theme
    assert intent_theme(pairs + [("pop", "a5")], ["rock", "pop"]) == "pop"
    page = [{"shelf": "jazz", "items": ["a2"]}, {"shelf": "rock", "items": ["a9", "a3"]}]
    assert judge_intent(page, pairs, "rock", items_per_shelf=10) == {
        "theme_shown": 1.0, "theme_first": 0.0, "theme_recall": 0.5}  # a2 is on the wrong shelf
    assert judge_intent(page, pairs, "pop", items_per_shelf=1)["theme_shown"] == 0.0
    # Training pages may carry their first theme as an intent; requests and held-out pairs do not change.
    data = read_lastfm(write_excerpt(tmp_path / "lastfm"))
    built = build(data, parse_month("2010-08"), themes=2, intent_share=1.0)
    assert all(p["context"] == {"intent": f"something {p['page'][0]['shelf'].replace('_', ' ')}"} for p in built.pages)
    assert built.summary["theme_intents"] == {"rock": "something rock", "chill_out": "something chill out"}
    plain = build(data, parse_month("2010-08"), themes=2)
    assert built.requests == plain.requests and built.heldout == plain.heldout
    assert not any("context" in p for p in plain.pages)

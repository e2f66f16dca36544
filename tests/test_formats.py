import json

import pytest

from homegen.data.formats import DataFormatError, iter_page_logs, read_catalog, read_interactions


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_sequence_text(tmp_path):
    users = read_interactions(write(tmp_path, "seq.txt", "1 5 6 7\n2 7 8\n\n3 9\n"))
    assert [(u.user_id, u.items) for u in users] == [("1", ["5", "6", "7"]), ("2", ["7", "8"]), ("3", ["9"])]


def test_pairs_text_keeps_file_order(tmp_path):
    users = read_interactions(write(tmp_path, "pairs.txt", "a x\nb y\na z\na x\n"))
    assert [(u.user_id, u.items) for u in users] == [("a", ["x", "z", "x"]), ("b", ["y"])]


def test_csv_orders_by_timestamp_iso_and_unix(tmp_path):
    text = ("user_id,item_id,timestamp,rating\n"
            "u1,i3,2024-01-03T00:00:00Z,5\n"
            "u1,i1,1704067200,4\n"  # 2024-01-01
            "u2,i9,5,\n"
            "u1,i2,2024-01-02,3\n")
    users = {u.user_id: u for u in read_interactions(write(tmp_path, "x.csv", text))}
    assert users["u1"].items == ["i1", "i2", "i3"]
    assert users["u1"].timestamps[0] == 1704067200.0
    assert users["u2"].items == ["i9"]


def test_movielens_ratings_dat_orders_by_timestamp(tmp_path):
    text = "1::1193::5::978300760\n1::661::3::978302109\n2::1357::5::978298709\n1::914::3::978301968\n"
    users = {u.user_id: u for u in read_interactions(write(tmp_path, "ratings.dat", text))}
    assert users["1"].items == ["1193", "914", "661"] and users["1"].timestamps == [978300760, 978301968, 978302109]
    assert users["2"].items == ["1357"]


def test_tsv_without_timestamp_keeps_file_order(tmp_path):
    users = read_interactions(write(tmp_path, "x.tsv", "item_id\tuser_id\nb\tu\na\tu\n"))
    assert users[0].items == ["b", "a"] and users[0].timestamps is None


@pytest.mark.parametrize("name,text,fmt,line,reason", [
    ("s.txt", "1 2 3\n2\n", "sequences", 2, "no items"),
    ("s.txt", "1 2 3\n1 4\n", "sequences", 2, "two lines"),
    ("p.txt", "a x\na x y\n", "pairs", 2, "expected `user item`"),
    ("c.csv", "user,item_id\nu,i\n", "auto", 1, "user_id"),
    ("c.csv", "user_id,item_id,timestamp\nu,i,1\nu,j,yesterday\n", "auto", 3, "bad timestamp"),
    ("c.csv", "user_id,item_id\nu,i,extra\n", "auto", 2, "expected 2 fields"),
    ("c.csv", "user_id,item_id,rating\nu,i,good\n", "auto", 2, "bad rating"),
    ("ratings.dat", "1::2::5::978300760\n1::3::5\n", "auto", 2, "found 3 fields"),
    ("ratings.dat", "1::2::5::978300760\n1::3::5::noon\n", "movielens", 2, "bad rating"),
])
def test_interaction_errors_name_file_and_line(tmp_path, name, text, fmt, line, reason):
    path = write(tmp_path, name, text)
    with pytest.raises(DataFormatError) as err:
        read_interactions(path, fmt)
    assert err.value.path == path and err.value.line == line and reason in str(err.value)
    assert str(err.value).startswith(f"{path}:{line}:")


def test_catalog(tmp_path):
    path = write(tmp_path, "c.jsonl", json.dumps({"item_id": 7, "title": "Golden Hour", "artist": "Nova",
                                                  "genres": ["indie pop"], "release_date": "2026-10-01",
                                                  "popularity": 0.7, "extra_field": 1}) + "\n"
                 + json.dumps({"item_id": "t2"}) + "\n")
    catalog = read_catalog(path)
    assert list(catalog) == ["7", "t2"]
    assert catalog["7"].text() == "Golden Hour Nova indie pop" and catalog["7"].popularity == 0.7


@pytest.mark.parametrize("lines,line,reason", [
    (['{"item_id": "a"}', '{"title": "x"}'], 2, "item_id"),
    (['{"item_id": "a"}', '{"item_id": "a"}'], 2, "duplicate"),
    (['{"item_id": "a", "genres": "rock"}'], 1, "genres"),
    (['{"item_id": "a", "release_date": "soon"}'], 1, "release_date"),
    (['{"item_id": "a", "popularity": "high"}'], 1, "popularity"),
    (['{"item_id": "a"', ], 1, "invalid JSON"),
    (['[1, 2]'], 1, "JSON object"),
])
def test_catalog_errors(tmp_path, lines, line, reason):
    path = write(tmp_path, "c.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=reason) as err:
        read_catalog(path)
    assert err.value.line == line and path in str(err.value)


PAGE = {"request_id": "r-1", "user_id": 42, "timestamp": 1763626500,
        "context": {"hour": 8, "weekday": 3, "device": "mobile", "country": "SE", "intent": "calm music"},
        "history": ["t9", "t17", 3],
        "page": [{"shelf": "made_for_you", "items": ["t1", "t2", "t3"], "streams": [1, 0, 0]},
                 {"shelf": "new_releases", "items": ["t8", "t5"], "streams": [0, 1]}],
        "unknown": "ignored"}


def test_page_log(tmp_path):
    path = write(tmp_path, "p.jsonl", json.dumps(PAGE) + "\n\n" + json.dumps({"user_id": "u1", "page": [
        {"shelf": "x", "items": ["a"]}]}) + "\n")
    logs = list(iter_page_logs(path))
    assert len(logs) == 2
    first = logs[0]
    assert first.user_id == "42" and first.history == ["t9", "t17", "3"] and first.intent == "calm music"
    assert first.context == {"hour": "8", "weekday": "3", "device": "mobile", "country": "SE"}
    assert [(s.shelf, s.items, s.streams) for s in first.page] == [
        ("made_for_you", ["t1", "t2", "t3"], [1, 0, 0]), ("new_releases", ["t8", "t5"], [0, 1])]
    assert logs[1].page[0].streams is None and logs[1].timestamp is None
    assert logs[1].page[0].propensities is None and logs[1].log_propensity is None


def test_page_log_with_propensities(tmp_path):
    record = json.loads(json.dumps(PAGE))
    record["page"][0]["propensities"] = [0.5, 0.25, 1]
    record["page"][1]["propensities"] = [0.1, 0.2]
    record["log_propensity"] = -7.5
    log = next(iter_page_logs(write(tmp_path, "p.jsonl", json.dumps(record) + "\n")))
    assert [s.propensities for s in log.page] == [[0.5, 0.25, 1], [0.1, 0.2]] and log.log_propensity == -7.5


@pytest.mark.parametrize("change,reason", [
    (lambda r: r.pop("user_id"), "user_id"),
    (lambda r: r.pop("page"), "page"),
    (lambda r: r.update(page=[]), "non-empty list of shelves"),
    (lambda r: r["page"][1].update(items=[]), r"page\[1\].items"),
    (lambda r: r["page"][0].pop("shelf"), r"page\[0\]"),
    (lambda r: r["page"][0].update(streams=[1, 0]), "one number per item"),
    (lambda r: r["page"][0].update(streams=[1, -1, 0]), "non-negative"),
    (lambda r: r.update(history="t1"), "history"),
    (lambda r: r.update(context=[1]), "context"),
    (lambda r: r.update(timestamp="noon"), "timestamp"),
    (lambda r: r.update(user_id=None), "user_id"),
    (lambda r: r["page"][0].update(propensities=[0.5, 0.5]), "one number per item"),
    (lambda r: r["page"][0].update(propensities=[0.5, 0.0, 0.5]), r"probabilities in \(0, 1\]"),
    (lambda r: r["page"][0].update(propensities=[0.5, 1.5, 0.5]), r"probabilities in \(0, 1\]"),
    (lambda r: r["page"][0].update(propensities=[0.5, "x", 0.5]), r"probabilities in \(0, 1\]"),
    (lambda r: r.update(log_propensity=0.3), "log_propensity"),
    (lambda r: r.update(log_propensity=float("-inf")), "log_propensity"),
])
def test_page_log_errors(tmp_path, change, reason):
    record = json.loads(json.dumps(PAGE))
    change(record)
    path = write(tmp_path, "p.jsonl", json.dumps(PAGE) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataFormatError, match=reason) as err:
        list(iter_page_logs(path))
    assert err.value.line == 2 and str(err.value).startswith(path + ":2:")


def test_non_utf8_is_reported(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"1 2 3\n2 \xff\xfe 4\n")
    with pytest.raises(DataFormatError, match="UTF-8"):
        read_interactions(str(path))


def test_a_non_utf8_byte_is_reported_at_its_own_line_past_the_first_chunk(tmp_path):
    path = tmp_path / "late.txt"  # 2,000 good lines: far past the chunk a text-mode file decodes at once
    path.write_bytes(b"".join(f"u{k} t{k}\n".encode() for k in range(1, 2000)) + b"u\xff t\n")
    with pytest.raises(DataFormatError, match=r"late.txt:2000: not UTF-8 text"):
        read_interactions(str(path))

"""serve.py on a tiny trained checkpoint: every page valid under random constraints, batch files, the
HTTP API under concurrency, and the HTML view in headless Chromium."""

import json
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ROOT, TINY_STEPS, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homegen.serving.app import ServerSettings
from homegen.serving.engine import PageEngine
from homegen.serving.requests import parse_request
from homegen.serving.schemas import PageResponseBody, ScoredPageBody
from homegen.serving.validity import PageValidator


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return PageEngine(tiny_checkpoint)


@pytest.fixture(scope="module")
def validator(engine):
    return PageValidator(engine.vocab, engine.eligibility_spec)


def assert_valid(validator, request, response):
    """Every rule of the page grammar and of the request, and well-formed scores."""
    assert validator.violations(request, response["page"]) == []
    for shelf in response["page"]:
        assert len(shelf["item_scores"]) == len(shelf["items"]) and all(s <= 0 for s in shelf["item_scores"])


def test_violations_are_detected(validator):
    request = parse_request({"user_id": "u1", "num_shelves": 2, "min_items_per_shelf": 2, "max_items_per_shelf": 3,
                             "exclude_items": ["t1"], "allowed_shelves": ["made_for_you", "popular_now"]})
    page = [{"shelf": "made_for_you", "items": ["t1", "t2"]}, {"shelf": "made_for_you", "items": ["t2"]},
            {"shelf": "new_releases", "items": ["t3", "t4", "t5", "t6"]}]
    problems = " | ".join(validator.violations(request, page))
    for expected in ("3 shelves", "repeats", "excluded item t1", "item t2 twice", "has 1 items",
                     "new_releases not allowed", "has 4 items"):
        assert expected in problems, problems


def test_decoder_mask_agrees_with_the_rules_item_by_item(engine, validator):
    """The (shelves x items) mask the decoder applies, built from the checkpoint's eligibility spec, equals
    the shelf rules judged item by item by id, for users with and without history (history-dependent
    shelves included)."""
    items = engine.vocab.items.item_ids
    rng = np.random.default_rng(0)
    histories = [[], ["t1", "t2", "t3"], list(rng.choice(items, 25, replace=False)), ["not_an_item", "t5"]]
    for history in histories:
        mask = engine.eligibility.matrix(history)
        for row, shelf in enumerate(engine.vocab.shelves):
            np.testing.assert_array_equal(mask[row], validator.eligible(shelf, items, history), err_msg=shelf)
    assert engine.eligibility.kind == "world" and engine.eligibility._dynamic  # both kinds of rule were compared


def test_history_dependent_shelves_are_served(engine, validator):
    """Shelves whose items come from the request's history reach the decoder as index lists: a page of
    only such shelves is served, from the history alone."""
    history = engine.vocab.items.item_ids[10:18]
    for shelf in ("recently_played", "because_you_listened"):
        request = parse_request({"user_id": "u1", "history": history, "allowed_shelves": [shelf], "num_shelves": 1,
                                 "min_items_per_shelf": 3, "max_items_per_shelf": 5})
        for response in engine.generate([request]) + engine.generate([request], objective="likelihood"):
            assert "error" not in response, response
            assert [s["shelf"] for s in response["page"]] == [shelf]
            assert validator.violations(request, response["page"]) == []
            if shelf == "recently_played":
                assert set(response["page"][0]["items"]) <= set(history)


def request_strategy(engine, familiarities: tuple[float, ...] = (0.0, 3.0, -3.0)):
    """Random valid requests for `engine`'s vocabulary (a semantic-ID checkpoint takes no familiarity)."""
    items = engine.vocab.items.item_ids
    shelves = engine.vocab.shelves

    @st.composite
    def build(draw):
        min_items = draw(st.integers(1, 3))
        obj = {"user_id": f"u{draw(st.integers(0, 199))}",
               "history": draw(st.lists(st.sampled_from(items), max_size=12)),
               "context": {"hour": draw(st.integers(0, 23)), "device": draw(st.sampled_from(["mobile", "tv", "car"]))},
               "num_shelves": draw(st.sampled_from([2, 4])), "min_items_per_shelf": min_items,
               "max_items_per_shelf": draw(st.sampled_from([3, 5])),
               "exclude_items": draw(st.lists(st.sampled_from(items), max_size=30)),
               "beam_size": draw(st.sampled_from([1, 3])), "seed": draw(st.integers(0, 1000)),
               "familiarity": draw(st.sampled_from(familiarities))}
        if draw(st.booleans()):
            obj["allowed_shelves"] = draw(st.lists(st.sampled_from(shelves), min_size=1, max_size=8, unique=True))
        if draw(st.booleans()):
            obj["temperature"] = draw(st.sampled_from([0.7, 1.0, 2.0]))
            obj["top_p"] = draw(st.sampled_from([0.5, 0.9, 1.0]))
            obj["top_k"] = draw(st.sampled_from([0, 5]))
        return parse_request(obj)

    return st.lists(build(), min_size=1, max_size=5)


def test_every_page_satisfies_every_constraint(engine, validator):
    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(request_strategy(engine))
    def check(requests):
        for request, response in zip(requests, engine.generate(requests), strict=True):
            if "error" in response:  # only when no allowed shelf can be filled
                assert "eligible items" in response["error"]
                continue
            assert_valid(validator, request, response)

    check()


def test_beam_pages_are_distinct_and_ranked(engine):
    """Beam search returns distinct pages, best first by its objective, as a separate teacher-forced pass
    scores them: likelihood by length-normalised log-probability (GNMT, alpha 0.6), streams by predicted
    streams plus 0.01 x the log-probability."""
    request = parse_request({"user_id": "u3", "beam_size": 4, "num_pages": 4, "num_shelves": 2,
                             "max_items_per_shelf": 5})
    for objective in ("likelihood", "streams"):
        response = engine.generate([request], objective=objective)[0]
        assert not [key for key in response if key.startswith("_")]  # nothing private in a public response
        pages = [p["page"] for p in response["pages"]]
        assert len(pages) == 4 and len({json.dumps(p) for p in pages}) == 4
        assert response["log_prob"] == response["pages"][0]["log_prob"]
        scored = engine.score([request] * 4, pages)
        for decoded, rescored in zip(response["pages"], scored):
            assert rescored["log_prob"] == pytest.approx(decoded["log_prob"], abs=2e-3)
        if objective == "likelihood":
            lengths = [sum(1 + len(s["items"]) for s in page) + 1 for page in pages]  # + EOS
            keys = [s["log_prob"] / ((5 + n) / 6) ** 0.6 for s, n in zip(scored, lengths)]
        else:
            assert response["predicted_streams"] == pytest.approx(scored[0]["predicted_streams"], abs=2e-3)
            keys = [s["predicted_streams"] + 0.01 * s["log_prob"] for s in scored]
        assert all(a >= b - 1e-3 for a, b in zip(keys, keys[1:])), (objective, keys)


def test_streams_search_settings_come_from_the_run_config_or_the_caller(engine, tiny_checkpoint):
    """`serve.stream_candidates` / `serve.prior_weight` / `serve.item_width` of the run's config set beam search; the
    constructor's arguments override them; a config without the section (older runs) gets the decoder's
    defaults; bad values are refused with the reason."""
    assert (engine.candidates, engine.prior_weight) == (engine.train_config["serve"]["stream_candidates"],
                                                        engine.train_config["serve"]["prior_weight"])
    wide = PageEngine(tiny_checkpoint, stream_candidates=1, prior_weight=0.5)
    assert (wide.candidates, wide.prior_weight) == (1, 0.5)
    # One shelf allowed (the one the default search opens with), so both searches fill the same shelf.
    ask = {"user_id": "u3", "beam_size": 2, "num_shelves": 1, "max_items_per_shelf": 4}
    shelf = engine.generate([parse_request(ask)])[0]["page"][0]["shelf"]
    request = parse_request({**ask, "allowed_shelves": [shelf]})
    # One candidate per step: every placed item is the most likely allowed one, so the first item's score
    # (its log-probability) is at least that of the 32-candidate search's first item.
    narrow_page, default_page = wide.generate([request])[0]["page"], engine.generate([request])[0]["page"]
    assert narrow_page[0]["shelf"] == default_page[0]["shelf"] == shelf
    assert narrow_page[0]["item_scores"][0] >= default_page[0]["item_scores"][0] - 1e-4
    older = dict(engine.train_config)
    del older["serve"]
    wide.train_config = older
    assert wide._search_settings(None, None, None) == (32, 0.01, 1)
    with pytest.raises(ValueError, match="stream_candidates >= 1"):
        wide._search_settings(0, None, None)
    with pytest.raises(ValueError, match="prior_weight >= 0"):
        wide._search_settings(None, -1.0, None)
    with pytest.raises(ValueError, match="item_width >= 1"):
        wide._search_settings(None, None, 0)
    assert wide.search_settings == {"stream_candidates": 1, "prior_weight": 0.5, "item_width": 1}
    with pytest.raises(ValueError, match="item_width 2 needs semantic item IDs"):  # an atomic checkpoint
        PageEngine(tiny_checkpoint, item_width=2)


def test_scoring_given_pages(engine):
    request = parse_request({"user_id": "u3", "num_shelves": 2, "max_items_per_shelf": 5})
    page = engine.generate([request], objective="likelihood")[0]["page"]
    scored, unknown = engine.score([request] * 2, [page, [{"shelf": "nope", "items": ["t1"]}]])
    assert [s["items"] for s in scored["page"]] == [s["items"] for s in page]
    assert scored["log_prob"] < sum(x for s in scored["page"] for x in s["item_scores"]) < 0
    probs = [p for s in scored["page"] for p in s["stream_probs"]]
    assert all(0 < p < 1 for p in probs) and scored["predicted_streams"] == pytest.approx(sum(probs), abs=1e-3)
    assert unknown == {"error": "unknown shelves or items: ['nope']"}


def test_engine_results_are_the_public_response_types(engine):
    """Every kind of result the engine gives (beam pages by both objectives, one and several sampled pages,
    several beam pages, scored pages) has exactly the public schema's fields: nothing private travels."""
    base = {"user_id": "u3", "num_shelves": 2, "max_items_per_shelf": 4, "request_id": "r1"}
    kinds = [(base, None), (base, "likelihood"), ({**base, "num_pages": 3}, None),
             ({**base, "temperature": 1.0}, None), ({**base, "temperature": 1.0, "num_pages": 2}, None)]
    for body, objective in kinds:
        [response] = engine.generate([parse_request(body)], objective=objective)
        assert PageResponseBody.model_validate(response).request_id == "r1"
    [scored] = engine.score([parse_request(base)], [response["page"]])
    assert ScoredPageBody.model_validate(scored).predicted_streams is not None
    with pytest.raises(ValueError, match="_stats"):  # a private key would be refused
        PageResponseBody.model_validate({**response, "_stats": {}})


def test_the_engine_view_scripts_use(engine):
    """The public view of what a checkpoint knows agrees with the engine's own decoding state."""
    assert engine.item_ids[:3] and all(engine.knows_item(i) for i in engine.item_ids[:3])
    assert engine.knows_shelf(engine.shelf_types[0]) and not engine.knows_shelf("nope") and not engine.knows_item("nope")
    assert not engine.semantic_ids and engine.has_value_head and engine.world is not None
    history = engine.item_ids[:8]
    assert engine.eligible(history).shape == (len(engine.shelf_types), len(engine.item_ids))
    request = parse_request({"user_id": "u3", "num_shelves": 2, "max_items_per_shelf": 4})
    [response] = engine.generate([request])
    tokens = engine.page_tokens(response["page"])
    assert len(tokens) <= engine.max_page_tokens(2, 4) and engine.item_ends(tokens).sum() == sum(
        len(s["items"]) for s in response["page"])
    assert engine.validator().violations(request, response["page"]) == []
    scores = engine.first_slot_scores([request], [response["page"][0]["shelf"]])
    assert scores.shape == (1, len(engine.item_ids)) and np.isfinite(scores).all()


def test_session_events_change_the_prompt_and_the_page(engine, validator):
    """Streamed and saved items join the history (newest last) and so the prompt; skipped items are never
    placed; unknown event names are ignored; the page stays valid for the request as sent."""
    base = {"user_id": "u3", "history": ["t1", "t2"], "num_shelves": 3, "min_items_per_shelf": 5,
            "max_items_per_shelf": 5}
    first = engine.generate([parse_request(base)])[0]["page"]
    shown = [i for s in first for i in s["items"]]
    session = [{"item": shown[0], "event": "stream"}, {"item": shown[1], "event": "skip"},
               {"item": shown[2], "event": "save"}, {"item": shown[3], "event": "hover"},
               {"item": shown[4], "event": "skip"}]
    request = parse_request({**base, "session": session})
    assert request.session == [(shown[0], "stream"), (shown[1], "skip"), (shown[2], "save"), (shown[4], "skip")]
    folded = request.with_session()
    assert folded.history == ["t1", "t2", shown[0], shown[2]] and folded.exclude_items == [shown[1], shown[4]]
    assert engine.prompt(folded) == engine.prompt(parse_request({**base, "history": folded.history}))
    assert engine.prompt(folded) != engine.prompt(parse_request(base))
    again = engine.generate([request])[0]
    placed = {i for s in again["page"] for i in s["items"]}
    assert shown[1] not in placed and shown[4] not in placed and again["page"] != first
    assert validator.violations(folded, again["page"]) == []
    scored = engine.score([request], [again["page"]])[0]  # scoring reads the same folded prompt
    assert scored["predicted_streams"] == pytest.approx(again["predicted_streams"], abs=2e-3)


def test_familiarity_brings_the_users_own_items_onto_the_page(engine, validator, tiny_semantic_checkpoint):
    """A positive familiarity places more of the history's items (beam search and sampling), a negative one
    fewer, every page still valid; a semantic-ID checkpoint refuses it with a reason."""
    history = engine.vocab.items.item_ids[100:160]
    base = {"user_id": "u3", "history": history, "num_shelves": 4, "min_items_per_shelf": 5, "max_items_per_shelf": 5}
    known = set(history)

    def own(fields: dict) -> int:
        request = parse_request({**base, **fields})
        response = engine.generate([request])[0]
        assert_valid(validator, request, response)
        return sum(item in known for s in response["page"] for item in s["items"])

    for mode in ({"beam_size": 2}, {"temperature": 1.0, "seed": 3}):
        plain, familiar, discovery = (own({**mode, "familiarity": f}) for f in (0.0, 8.0, -8.0))
        assert familiar > plain >= discovery and familiar >= 10, (mode, plain, familiar, discovery)
    from homegen.serving.requests import RequestError

    with pytest.raises(RequestError, match="one token per item"):
        PageEngine(tiny_semantic_checkpoint).request_rules(parse_request({**base, "familiarity": 1.0}))


def test_objectives(engine):
    """The fixture has a value head: beam search maximises predicted streams unless asked for likelihood."""
    request = parse_request({"user_id": "u3", "beam_size": 2, "num_shelves": 2, "max_items_per_shelf": 5,
                             "min_items_per_shelf": 5})
    streams = engine.generate([request])[0]
    likelihood = engine.generate([request], objective="likelihood")[0]
    assert engine.objective == "streams" and "predicted_streams" not in likelihood
    assert 0 < streams["predicted_streams"] < 10  # a probability per item, 10 items
    with pytest.raises(ValueError, match="objective"):
        engine.generate([request], objective="clicks")


def test_batch_file_keeps_order_and_reports_bad_lines(tiny_checkpoint, tmp_path):
    lines = [json.dumps({"user_id": "u1", "num_shelves": 2}), "{not json",
             json.dumps({"user_id": "u2", "num_shelves": "many"}), "",
             json.dumps({"history": ["t1", "t2"], "num_shelves": 3, "temperature": 0.8, "seed": 4}),
             json.dumps({"user_id": "u3", "allowed_shelves": ["no_such_shelf"]}),
             json.dumps({"context": {}}), json.dumps({"user_id": "u4", "num_shelves": 2})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint, "--requests",
                             str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--batch_size", "3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Every line gets its response; the failed lines make the exit status 1, with a one-line summary.
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "serve.py: 4 request line(s) failed; first: line 2: invalid JSON")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 7
    assert [o.get("user_id") for o in out if "error" not in o] == ["u1", None, "u4"]
    errors = {o["line"]: o["error"] for o in out if "error" in o}
    assert set(errors) == {2, 3, 6, 7}
    assert "invalid JSON" in errors[2] and "num_shelves" in errors[3]
    assert "no_such_shelf" in errors[6] and "user_id" in errors[7]
    assert "4 request(s) with errors" in result.stdout
    assert [o["checkpoint_step"] for o in out if "error" not in o] == [TINY_STEPS] * 3


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "serve.py", "--checkpoint", str(tmp_path), "--user", "u1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and f"no checkpoint in {tmp_path}" in result.stderr


def test_all_good_batch_exits_zero(tiny_checkpoint, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"user_id": "u1", "num_shelves": 2}) + "\n")
    good = subprocess.run([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint, "--requests",
                           str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert good.returncode == 0 and "0 request(s) with errors" in good.stdout, good.stderr


def test_a_page_that_cannot_be_served_exits_nonzero(tiny_checkpoint, monkeypatch, capsys):
    import serve
    from homegen.serving.engine import PageEngine

    failed = {"error": "no valid page could be decoded for this request"}
    monkeypatch.setattr(PageEngine, "generate", lambda self, requests, objective=None: [failed] * len(requests))
    assert serve.main(["--checkpoint", tiny_checkpoint, "--user", "u1"]) == 1
    assert capsys.readouterr().err.strip() == f"serve.py: error: {failed['error']}"


SMALL_BUCKETS = dict(rows=(1, 8), beam_sizes=(1, 4), sample_widths=(2,))  # 6 shapes: a quick warm-up


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """The HTTP server on its own bucketed engine; `calls` records the size of every decoded batch."""
    from homegen.serving.buckets import ShapeBuckets

    engine = PageEngine(tiny_checkpoint, buckets=ShapeBuckets(**SMALL_BUCKETS))
    calls = []
    original = engine.generate

    def counting(requests):
        calls.append(len(requests))
        return original(requests)

    engine.generate = counting
    with running_server(engine, ServerSettings(max_wait_s=0.05)) as (url, _):
        calls.clear()  # the warm-up's batches
        yield url, calls


def post(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/pages", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_api_under_concurrency(validator, server):
    url, calls = server
    with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok", "checkpoint_step": TINY_STEPS, "reloading": False}
    post(url, {"user_id": "warm", "num_shelves": 2, "max_items_per_shelf": 5})  # compile once
    calls.clear()
    good = [{"user_id": f"u{k}", "num_shelves": 2, "max_items_per_shelf": 5, "exclude_items": [f"t{k}"]}
            for k in range(12)]
    bad = [(b"{broken", "not valid JSON"), ({"num_shelves": 2}, "needs 'user_id' or 'history'"),
           ({"user_id": "x", "beam_size": 99}, "beam_size"), ({"user_id": "x", "exclude_items": "t1"}, "exclude_items"),
           ({"user_id": "x", "min_items_per_shelf": 9, "max_items_per_shelf": 3}, "min_items_per_shelf"),
           ({"user_id": "x", "allowed_shelves": ["nope"]}, "unknown shelves"), ([1, 2], "JSON object")]
    with ThreadPoolExecutor(16) as pool:
        good_results = list(pool.map(lambda b: post(url, b), good))
        bad_results = list(pool.map(lambda b: post(url, b[0], raw=isinstance(b[0], bytes)), bad))
    for body, (status, response) in zip(good, good_results):
        assert status == 200 and response["user_id"] == body["user_id"]
        assert_valid(validator, parse_request(body), response)
    for (_, reason), (status, response) in zip(bad, bad_results):
        assert status == 400 and reason in response["error"], response
    assert max(calls) > 1  # concurrent requests were batched together
    req = urllib.request.Request(url + "/v2/nothing", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 404


def test_html_view_renders_in_headless_chromium(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    url, _ = server
    page_url = url + "/?user_id=u5&history=t1,t2&hour=20&device=tv&num_shelves=3"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page_url], capture_output=True, text=True, timeout=180).stdout
    assert dom.count("class=\"shelf\"") == 3, dom[:2000]
    assert dom.count("class=\"card\"") >= 3 * 4
    shot = tmp_path / "page.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,900", page_url],
                   capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 5000


def test_scale_benchmark_decodes_every_request(tmp_path):
    """scripts/benchmark_scale.py on a small catalog, atomic and semantic: every request (random index-list
    rules) gets a page that the script's independent check finds valid (semantic pages at item widths 1 and 2), the
    per-request bytes depend neither on the catalog nor on the item tokens, and a training figure is printed for
    each."""
    result = subprocess.run([sys.executable, "scripts/benchmark_scale.py", "--items", "2000,8000", "--batches", "2",
                             "--calls", "1", "--train_steps", "1", "--item_width", "1,2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sizes = [line.split("per request ")[1].split(" bytes")[0] for line in result.stdout.splitlines()
             if "per request" in line]
    assert len(sizes) == 6 and len(set(sizes)) == 1, result.stdout  # atomic, semantic at widths 1 and 2
    assert result.stdout.count("batch   2, beam 4: p50") == 2 and result.stdout.count("tokens/s") == 4
    assert result.stdout.count("batch   2, beam 4, item width 2: p50") == 2, result.stdout
    assert result.stdout.count("4 pages, all valid") == 6, result.stdout


def test_decode_step_benchmark_prints_a_row_per_shape(capsys):
    """scripts/benchmark_decode_step.py times each (rows, slots) with and without the beam reorder, and
    refuses a cache too short for the prompt and the steps."""
    from scripts.benchmark_decode_step import main

    tiny = ["--d_model", "32", "--num_layers", "2", "--num_heads", "2", "--num_kv_heads", "1", "--head_dim", "16",
            "--mlp_dim", "64", "--vocab", "100", "--steps", "8"]
    main(["--rows", "2", "--slots", "72,96", *tiny])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("2", "72"), ("2", "96")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        main(["--slots", "71", *tiny])
    assert "at least 72" in capsys.readouterr().err


def test_startup_benchmark_times_a_real_server_and_checks_its_pages(tiny_semantic_checkpoint, tiny_world_dir,
                                                                   tmp_path, capsys):
    """scripts/benchmark_startup.py starts serve.py --port, waits for /healthz, sends requests over HTTP and
    checks every page with PageValidator; a server that cannot start is a failure, not a hang."""
    from scripts.benchmark_startup import main

    requests = f"{tiny_world_dir}/requests.jsonl"
    assert main(["--checkpoint", tiny_semantic_checkpoint, "--requests", requests, "--count", "3",
                 "--", "--batch_sizes", "1", "--beam_sizes", "4", "--sample_widths", "1"]) == 0
    out = capsys.readouterr().out
    assert "| pages valid under PageValidator | 3 of 3 (0 errors) |" in out, out
    startup = float(out.split("(load + compile) | ")[1].split(" s")[0])
    assert startup > 0 and "decoding shapes" in out
    assert main(["--checkpoint", str(tmp_path / "no_run"), "--requests", requests, "--count", "1"]) == 1
    assert "exited with status" in capsys.readouterr().err


# --- hostile input (issue 12's defects, each reproduced before its fix) -----------------------------------

def test_one_failing_request_fails_alone():
    from homegen.serving.worker import generate_isolated

    def generate(requests):
        if "bad" in requests:
            raise RuntimeError("boom")
        return [f"page for {r}" for r in requests]

    outcomes = generate_isolated(generate, ["a", "bad", "c"])
    assert outcomes[0] == "page for a" and outcomes[2] == "page for c" and isinstance(outcomes[1], RuntimeError)
    assert generate_isolated(generate, ["a", "c"]) == ["page for a", "page for c"]


@pytest.mark.parametrize("body,reason", [
    ({"user_id": "u", "context": {"intent": "\ud800"}}, "'context.intent' is not valid Unicode text"),
    ({"user_id": "u\udfff"}, "'user_id' is not valid Unicode text"),
    ({"user_id": "u", "context": {"intent": "x" * 10_000}}, "10,000 characters; at most 1,000"),
    ({"user_id": "u", "history": ["t1"] * 10_001}, "'history' has 10,001 entries"),
    ({"user_id": "u", "exclude_items": ["t" * 300]}, "an id in 'exclude_items' has 300 characters"),
    ({"user_id": "u", "context": {f"k{i}": i for i in range(65)}}, "'context' has 65 fields"),
    ({"user_id": "u", "session": {"item": "t1"}}, "'session' must be a list"),
    ({"user_id": "u", "session": [{"item": "t1"}]}, "'session' event 0 needs"),
    ({"user_id": "u", "session": [{"item": ["t1"], "event": "stream"}]}, "'session' event 0 needs"),
    ({"user_id": "u", "session": [{"item": "t1", "event": "skip"}] * 10_001}, "'session' has 10,001 events"),
    ({"user_id": "u", "familiarity": 50}, "'familiarity' must be between -20.0 and 20.0"),
    ({"user_id": "u", "familiarity": "high"}, "'familiarity' must be a number"),
])
def test_hostile_fields_are_refused_with_a_reason(body, reason):
    from homegen.serving.requests import RequestError

    with pytest.raises(RequestError, match=reason.replace("(", r"\(")):
        parse_request(body)


def test_long_intents_are_cut_to_what_a_training_row_holds(engine):
    for intent in ("chill evening jazz " * 50, "x" * 1_000):
        request = parse_request({"user_id": "u", "history": engine.vocab.items.item_ids[:40],
                                 "context": {"intent": intent}, "num_shelves": 2, "max_items_per_shelf": 5})
        page_tokens = engine.grammar.max_length(2, 5)
        assert len(engine.prompt(request)) + page_tokens <= engine.seq_len
    [response] = engine.generate([request])
    assert response["page"]


def raw_exchange(url: str, data: bytes, wait_s: float = 10.0) -> bytes:
    """Sends raw bytes to the server and returns everything it answers until it closes or goes quiet."""

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_http_hostile_requests(server):
    url, _ = server
    # A lone surrogate among valid requests: it gets a 400, every other request its page.
    bodies = [{"user_id": f"u{k}", "num_shelves": 2, "max_items_per_shelf": 5} for k in range(7)]
    bodies.insert(3, {"user_id": "u", "context": {"intent": "\ud800"}, "num_shelves": 2})
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: post(url, json.dumps(b).encode(), raw=True), bodies))
    assert [status for status, _ in results] == [200] * 3 + [400] + [200] * 4, results
    assert "not valid Unicode" in results[3][1]["error"]
    # Deeply nested JSON is a 400, not an uncaught RecursionError.
    status, response = post(url, b"[" * 100_000 + b"]" * 100_000, raw=True)
    assert status == 400 and "nested too deeply" in response["error"]
    # A body over the limit gets a 413 and the connection closes: a request hidden in it is never served.
    hidden = b"POST /v1/pages HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n{\"user_id\": \"h\"}"
    answer = raw_exchange(url, b"POST /v1/pages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20) + hidden)
    assert answer.startswith(b"HTTP/1.1 413") and answer.count(b"HTTP/1.1") == 1 and b'"user_id"' not in answer
    # Content-Length: -1 is a 400 that closes the connection (it used to hold a thread forever).
    answer = raw_exchange(url, b"POST /v1/pages HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1") == 1
    # "²" is a digit to str.isdigit but not to int(): the HTML view answers with the reason.
    with urllib.request.urlopen(url + "/?user_id=u&num_shelves=%C2%B2", timeout=60) as r:
        assert r.status == 200 and "num_shelves" in r.read().decode()
    # HEAD and OPTIONS are answered (they were 501).
    for method, code in (("HEAD", 200), ("OPTIONS", 204)):
        with urllib.request.urlopen(urllib.request.Request(url + "/healthz", method=method), timeout=30) as r:
            assert r.status == code
            assert method == "HEAD" or "POST" in r.headers["Allow"]


def test_http_slow_clients_time_out(tiny_checkpoint):
    engine = PageEngine(tiny_checkpoint)
    with running_server(engine, ServerSettings(client_timeout_s=1.0)) as (url, _):
        answer = raw_exchange(url, b"POST /v1/pages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"us")
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer, answer
        # 1,000 idle connections cost no thread each (the server is one event loop), and it still answers.
        threads = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) for _ in range(1000)]
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
                assert r.status == 200
            assert threading.active_count() < threads + 5
        finally:
            for s in idle:
                s.close()


def test_batch_file_survives_hostile_lines(tiny_checkpoint, tmp_path):
    good = json.dumps({"user_id": "u1", "num_shelves": 2}).encode()
    lines = [good, b'{"user_id": "u", "context": {"intent": "\\ud800"}}', b"[" * 50_000 + b"]" * 50_000,
             b'{"user_id": "caf\xe9"}', good]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = subprocess.run([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint, "--requests",
                             str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o.get("line") for o in out] == [None, 2, 3, 4, None]
    assert "not valid Unicode" in out[1]["error"] and "nested too deeply" in out[2]["error"]
    assert "not UTF-8" in out[3]["error"] and out[0]["page"] and out[4]["page"]


def test_request_bytes_follow_the_formula_on_real_requests(tiny_checkpoint, tmp_path):
    """scripts/benchmark_scale.py --checkpoint --requests: what each real request sends is 8 x pairs +
    4 x exclusions + 4 x familiar items + shelf types + 16 bytes (checked request by request inside the
    script)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"user_id": f"u{k}", "history": [f"t{k + j}" for j in range(k)],
                                            "exclude_items": [f"t{900 + j}" for j in range(k)],
                                            "familiarity": float(k % 2)}) + "\n"
                                for k in range(1, 6)))
    result = subprocess.run([sys.executable, "scripts/benchmark_scale.py", "--checkpoint", tiny_checkpoint,
                             "--requests", str(requests)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "8 x pairs + 4 x exclusions" in result.stdout and "exclusions               mean 3.0" in result.stdout

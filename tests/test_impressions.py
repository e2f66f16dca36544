"""Impression logs (serving/impressions.py): rotation, a folder that cannot be written, torn last lines;
served pages logged with exact propensities and joined with outcome events into page logs that train.py
and scripts/ope.py read; and no answered request lost when the server is killed with SIGKILL under load."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ROOT, free_port, running_server, tiny_config, train_cli

from homegen.data.formats import DataFormatError, parse_page_log
from homegen.serving.impressions import LogSettings, RotatingLog, log_files, read_log_lines


def post(url: str, path: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def logged(folder: str, prefix: str = "impressions") -> list[dict]:
    return [record for path in log_files(folder, prefix) for _, record in read_log_lines(path)]


def test_rotation_by_size_keeps_every_record_in_order_and_prunes(tmp_path):
    written = []
    log = RotatingLog(str(tmp_path), "impressions", LogSettings(max_bytes=400, fsync_s=0.05),
                      on_written=written.append)
    futures = [log.append({"request_id": f"r{k}", "pad": "x" * 50}) for k in range(30)]
    assert all(f.result(timeout=10) for f in futures)
    log.close()
    files = log_files(str(tmp_path), "impressions")
    assert len(files) >= 5 and all(os.path.getsize(f) <= 400 for f in files)
    assert [r["request_id"] for r in logged(str(tmp_path))] == [f"r{k}" for k in range(30)]
    assert sum(written) == 30
    pruned = RotatingLog(str(tmp_path), "impressions", LogSettings(max_bytes=400, keep_files=2))
    assert all(pruned.append({"request_id": f"s{k}", "pad": "x" * 50}).result(timeout=10) for k in range(12))
    pruned.close()
    assert len(log_files(str(tmp_path), "impressions")) == 2


def test_rotation_by_age(tmp_path):
    log = RotatingLog(str(tmp_path), "events", LogSettings(max_age_s=0.2))
    assert log.append({"request_id": "a"}).result(timeout=10)
    time.sleep(1.1)  # file names carry the second they were opened
    assert log.append({"request_id": "b"}).result(timeout=10)
    log.close()
    files = log_files(str(tmp_path), "events")
    assert len(files) == 2 and [r["request_id"] for r in logged(str(tmp_path), "events")] == ["a", "b"]


def test_a_folder_that_cannot_be_written_drops_and_reports_then_recovers(tmp_path, caplog):
    folder = tmp_path / "logs"
    folder.write_text("a file where the folder should be")  # as unwritable as a full disk, even for root
    dropped = []
    log = RotatingLog(str(folder), "impressions", LogSettings(), on_dropped=lambda n, why: dropped.append((n, why)))
    assert log.append({"request_id": "lost"}).result(timeout=10) is False
    assert dropped == [(1, "EEXIST")]  # os.makedirs meets the file
    assert "cannot be written" in caplog.text
    folder.unlink()
    folder.mkdir()
    assert log.append({"request_id": "kept"}).result(timeout=10) is True
    log.close()
    assert [r["request_id"] for r in logged(str(folder))] == ["kept"]


def test_a_server_whose_log_folder_cannot_be_written_still_answers(tmp_path):
    """Pages are answered 200 and the dropped records counted; nothing fails the request."""
    from test_server import StubEngine

    from homegen.serving.app import ServerSettings

    blocked = tmp_path / "logs"
    blocked.write_text("a file where the folder should be")
    with running_server(StubEngine(), ServerSettings(impressions_dir=str(blocked))) as (url, _):
        answers = [post(url, "/v1/pages", {"user_id": f"u{k}"}) for k in range(3)]
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    assert [status for status, _ in answers] == [200] * 3 and all(body["request_id"] for _, body in answers)
    assert 'homegen_log_records_total{log="impressions",result="dropped_EEXIST"} 3.0' in metrics


def test_torn_last_line_is_skipped_and_a_bad_line_is_named(tmp_path, caplog):
    path = tmp_path / "impressions-20261204T000000-1-000001.jsonl"
    path.write_text('{"request_id": "a", "page": []}\n{"request_id": "b", "pa')
    assert [r["request_id"] for _, r in read_log_lines(str(path))] == ["a"]
    assert f"{path}:2: an unterminated last line" in caplog.text
    path.write_text('{"request_id": "a", "page": []}\nnot json\n{"request_id": "c", "page": []}\n')
    with pytest.raises(DataFormatError, match=rf"{path}:2: invalid JSON"):
        list(read_log_lines(str(path)))


@pytest.fixture(scope="module")
def served_logs(tiny_checkpoint, tmp_path_factory):
    """A server with an impressions folder: 8 beam pages and 8 sampled pages for the tiny world's users
    (two sent with their own request ids), and stream events for each sampled page's first two items."""
    from homegen.serving.app import ServerSettings
    from homegen.serving.engine import PageEngine

    folder = str(tmp_path_factory.mktemp("impressions"))
    engine = PageEngine(tiny_checkpoint)
    requests = [{"user_id": f"u{k}", "num_shelves": 4, "min_items_per_shelf": 5, "max_items_per_shelf": 5,
                 **({"temperature": 1.0, "seed": k} if k >= 8 else {}), **({"request_id": f"mine-{k}"} if k in (0, 8) else {})}
                for k in range(16)]
    with running_server(engine, ServerSettings(impressions_dir=folder)) as (url, _):
        responses = [post(url, "/v1/pages", r) for r in requests]
        for status, response in responses[8:]:
            items = response["page"][0]["items"][:2]
            assert post(url, "/v1/events", {"request_id": response["request_id"], "events": [
                {"item": items[0], "event": "stream"}, {"item": items[1], "event": "stream"},
                {"item": items[1], "event": "stream"}, {"item": response["page"][1]["items"][0], "event": "skip"}]}) \
                == (202, {"accepted": 4})
        refusals = [post(url, "/v1/events", body) for body in
                    ({"request_id": "x", "events": []}, {"request_id": "x", "events": [{"item": "t1", "event": "clicked"}]},
                     [1])]
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    return folder, requests, responses, refusals, metrics


def test_served_pages_are_logged_with_exact_propensities(served_logs):
    folder, requests, responses, refusals, metrics = served_logs
    assert all(status == 200 for status, _ in responses)
    ids = [r["request_id"] for _, r in responses]
    assert ids[0] == "mine-0" and ids[8] == "mine-8" and len(set(ids)) == 16  # kept, else assigned
    records = {r["request_id"]: r for r in logged(folder)}
    assert set(records) == set(ids)
    for (_, response), request in zip(responses, requests):
        record = records[response["request_id"]]
        assert record["user_id"] == request["user_id"] and record["checkpoint_step"] == response["checkpoint_step"]
        assert [s["items"] for s in record["page"]] == [s["items"] for s in response["page"]]
        parse_page_log(record, "impressions", 1)  # a valid FORMATS.md §3 page log
        props = [p for s in record["page"] for p in s["propensities"]]
        if "temperature" in request:  # sampled at temperature 1: each item's probability given the page so far
            assert all(0 < p < 1 for p in props) and record["decoding"]["temperature"] == 1.0
            # the page's log-propensity adds the shelf and end tokens' to the items'
            assert record["log_propensity"] <= sum(np.log(props)) + 1e-4
            assert response["log_propensity"] == record["log_propensity"]
            model_item_logp = sum(v for s in response["page"] for v in s["item_scores"])
            assert sum(np.log(props)) == pytest.approx(model_item_logp, abs=1e-3)  # temperature 1, no filter
        else:  # beam search is deterministic
            assert props == [1.0] * len(props) and record["log_propensity"] == 0.0
    assert 'homegen_log_records_total{log="impressions",result="written"} 16.0' in metrics
    assert 'homegen_log_records_total{log="events",result="written"} 8.0' in metrics
    assert [status for status, _ in refusals] == [400, 400, 400]
    assert "'events' must be a non-empty list" in refusals[0][1]["error"]


def test_join_counts_streams_and_round_trips_into_training_and_ope(served_logs, tiny_checkpoint, data_dir,
                                                                   tiny_world_dir, tmp_path):
    folder, requests, responses, _, _ = served_logs
    pages = str(tmp_path / "pages.jsonl")
    result = subprocess.run([sys.executable, "-m", "homegen.cli", "join", "--impressions", folder, "--output", pages],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "16 pages, 8 with events, 24 streams" in result.stdout
    joined = {json.loads(line)["request_id"]: json.loads(line) for line in open(pages)}
    for _, response in responses[8:]:
        streams = [s["streams"] for s in joined[response["request_id"]]["page"]]
        assert streams[0][:2] == [1, 2] and sum(map(sum, streams)) == 3
    assert all(sum(map(sum, (s["streams"] for s in joined[r["request_id"]]["page"]))) == 0 for _, r in responses[:8])

    ope = subprocess.run([sys.executable, "scripts/ope.py", "--checkpoint", tiny_checkpoint, "--logs", pages,
                          "--pages", "16", "--samples", "1", "--out", str(tmp_path / "ope")],
                         cwd=ROOT, capture_output=True, text=True)
    assert ope.returncode == 0, ope.stderr
    table = json.load(open(tmp_path / "ope" / "ope.json"))
    assert table["logging policy"]["ips"]["value"] == pytest.approx(24 / 16)  # ratios of 1: the logged streams

    cfg = tiny_config(str(tmp_path / "tfds"), steps=2, eval_every=2, checkpoint_every=2, batch_size=8)
    cfg.data.page_logs, cfg.data.catalog = pages, os.path.join(tiny_world_dir, "catalog.jsonl")
    cfg.data.world = tiny_world_dir  # pages served in that world: its shelf rules and evaluation
    train = train_cli(tmp_path / "run", cfg)
    out, _ = train.communicate(timeout=600)
    assert train.returncode == 0, out
    from homegen.evaluation.pages import world_folder
    from homegen.training.checkpoints import Checkpoints

    _, meta = Checkpoints(str(tmp_path / "run" / "checkpoints"), read_only=True).read_meta(2)
    assert meta["eligibility"]["kind"] == "world" and world_folder(meta, str(tmp_path / "run")) == tiny_world_dir


def test_kill_9_under_load_loses_no_answered_impression(tiny_checkpoint, tmp_path):
    folder = str(tmp_path / "logs")
    port = free_port()
    server = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint, "--port", str(port),
                               "--batch_sizes", "1,4", "--beam_sizes", "2", "--sample_widths", "1",
                               "--impressions", folder, "--log_fsync_s", "5"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url, answered, lock = f"http://127.0.0.1:{port}", [], threading.Lock()
    try:
        for line in server.stdout:
            if "serving checkpoint step" in line:
                break

        def client(k: int) -> None:
            for j in range(1000):
                try:
                    status, body = post(url, "/v1/pages", {"user_id": f"u{k}", "request_id": f"c{k}-{j}",
                                                           "num_shelves": 2, "beam_size": 2})
                except OSError:  # the server is gone
                    return
                if status == 200:
                    with lock:
                        answered.append(body["request_id"])

        with ThreadPoolExecutor(6) as pool:
            for k in range(6):
                pool.submit(client, k)
            deadline = time.time() + 120
            while len(answered) < 40 and time.time() < deadline:
                time.sleep(0.05)
            server.send_signal(signal.SIGKILL)  # mid-load: requests queued, decoding and being written
            server.wait(timeout=30)
        assert len(answered) >= 40
        kept = {r["request_id"] for r in logged(folder)}
        assert set(answered) <= kept, sorted(set(answered) - kept)[:5]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_exploration_takes_its_share_by_request_id_and_leaves_sampling_requests_alone():
    from homegen.serving.requests import parse_request
    from homegen.serving.traffic import Exploration, salted_unit

    explore = Exploration(share=0.1, temperature=0.7)
    served = [explore.apply(parse_request({"user_id": "u1", "request_id": f"r{k}"})) for k in range(4000)]
    explored = [r for r in served if r.exploration]
    assert 0.085 < len(explored) / 4000 < 0.115  # binomial sd 0.0047
    assert all(r.temperature == 0.7 and r.num_pages == 1 for r in explored)
    assert len({r.seed for r in explored}) == len(explored)  # a seed of its own
    again = explore.apply(parse_request({"user_id": "u2", "request_id": explored[0].request_id}))
    assert again.exploration and again.seed == explored[0].seed  # the id decides, not the user
    asked = parse_request({"user_id": "u1", "request_id": "r0", "temperature": 1.5})
    assert Exploration(share=1.0).apply(asked) == asked
    assert Exploration(share=0.0).apply(served[0]).exploration is False
    assert salted_unit("a", "x") != salted_unit("b", "x")
    with pytest.raises(ValueError, match="share"):
        Exploration(share=1.5)


def test_batch_mode_logs_explored_pages_with_their_propensities(tiny_checkpoint, tmp_path):
    requests = tmp_path / "requests.jsonl"
    lines = [{"user_id": f"u{k}", "num_shelves": 3} for k in range(6)]
    lines.append({"user_id": "u9", "num_shelves": 3, "temperature": 1.0, "seed": 2**31 - 1})  # the largest seed
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = subprocess.run([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint, "--requests", str(requests),
                             "--output", str(tmp_path / "out.jsonl"), "--impressions", str(tmp_path / "logs"),
                             "--explore_share", "1.0", "--explore_temperature", "0.8"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "impressions: 7 logged" in result.stdout
    responses = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    records = {r["request_id"]: r for r in logged(str(tmp_path / "logs"))}
    assert set(records) == {r["request_id"] for r in responses}
    for response in responses:
        record = records[response["request_id"]]
        explored = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "num_pages": 1, "exploration": True}
        asked = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_pages": 1}  # a sampling request: as asked
        assert record["decoding"] == (asked if record["user_id"] == "u9" else explored)
        assert all(0 < p < 1 for s in record["page"] for p in s["propensities"])
    bad = subprocess.run([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint, "--requests", str(requests),
                          "--output", str(tmp_path / "o.jsonl"), "--explore_share", "2"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "the exploration share must be in [0, 1]" in bad.stderr

"""The HTTP server's operations: the OpenAPI document, /metrics, a full queue (503), deadlines (504), one
failing request in a batch (500 for it alone), hot reload (on request and by watching the run folder) without
failing a request in flight, and graceful drain on SIGTERM."""

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, TINY_STEPS, free_port, running_server

from homegen.serving.app import ServerSettings


class StubEngine:
    """What the server needs of an engine: pages after `delay_s`, an exception for user "boom"."""

    buckets = None
    path = "/nonexistent"

    def __init__(self, step: int = 1, delay_s: float = 0.0):
        self.step, self.delay_s = step, delay_s

    def generate(self, requests):
        time.sleep(self.delay_s)
        if any(r.user_id == "boom" for r in requests):
            raise RuntimeError("a bug this request triggers")
        return [{"request_id": r.request_id, "user_id": r.user_id,
                 "page": [{"shelf": "s", "items": ["t1"], "item_scores": [-1.0]}],
                 "log_prob": -1.0, "checkpoint_step": self.step} for r in requests]

    def describe(self, item_id):
        return {}


def call(url: str, path: str = "/v1/pages", body=None, method: str | None = None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_openapi_document_and_metrics():
    with running_server(StubEngine()) as (url, _):
        status, text, _ = call(url, "/openapi.json")
        doc = json.loads(text)
        assert status == 200 and doc["openapi"].startswith("3.")
        post = doc["paths"]["/v1/pages"]["post"]
        schema = post["requestBody"]["content"]["application/json"]["schema"]
        assert {"user_id", "history", "context", "beam_size", "num_pages"} <= set(schema["properties"])
        assert {"200", "400", "413", "500", "503", "504"} <= set(post["responses"])
        assert "PageResponseBody" in doc["components"]["schemas"] and "/admin/reload" in doc["paths"]

        for body in ({"user_id": "a"}, {"user_id": "b"}, {"num_shelves": 2}, {"user_id": "boom"}):
            call(url, body=body)
        status, text, headers = call(url, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line and not line.startswith("#")}
        assert lines['homegen_requests_total{endpoint="/v1/pages",status="200"}'] == 2
        assert lines['homegen_requests_total{endpoint="/v1/pages",status="400"}'] == 1
        assert lines['homegen_requests_total{endpoint="/v1/pages",status="500"}'] == 1
        assert lines['homegen_errors_total{kind="internal"}'] == 1
        assert lines["homegen_pages_total"] == 2 and lines["homegen_request_seconds_count"] == 4
        assert lines["homegen_batch_size_count"] >= 2 and lines["homegen_checkpoint_step"] == 1
        assert lines["homegen_queue_depth"] == 0 and lines["process_resident_memory_bytes"] > 1e7


def test_one_failing_request_gets_500_and_its_batch_is_served():
    with running_server(StubEngine(delay_s=0.2), ServerSettings(max_wait_s=0.2)) as (url, app):
        users = ["a", "b", "boom", "c", "d"]
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda u: call(url, body={"user_id": u}), users))
        assert [status for status, _, _ in results] == [200, 200, 500, 200, 200]
        assert "internal error" in json.loads(results[2][1])["error"]
        assert app.state.metrics.batch_size.collect()[0].samples  # they were batched


def test_full_queue_is_503_with_retry_after_and_late_requests_504():
    settings = ServerSettings(max_queue=2, max_wait_s=0.0, deadline_s=1.5)
    with running_server(StubEngine(delay_s=1.0), settings) as (url, _):
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda k: call(url, body={"user_id": f"u{k}"}), range(12)))
        codes = sorted(status for status, _, _ in results)
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503, 504}, codes
        busy = next(r for r in results if r[0] == 503)
        assert busy[2]["retry-after"] == "1" and "busy" in json.loads(busy[1])["error"]
        assert 504 in codes, codes  # queued behind the slow batches past the deadline


class CatalogStubEngine(StubEngine):
    """A stub that records the catalogs it is given."""

    def __init__(self):
        super().__init__()
        self.added = []

    def add_catalog(self, catalog, source):
        self.added.append((source, sorted(catalog)))
        return {"added": len(catalog), "items": len(catalog), "placeable": len(catalog)}


def test_admin_endpoints_need_the_token_and_catalogs_stay_in_their_directory(tmp_path):
    """POST /v1/catalog and /admin/reload: 403 when the server has no admin token, 401 without or with a wrong
    token; with it, a catalog is read only from the operator's directory: absolute paths, '..' and a symbolic
    link out of it are 400s that open nothing and quote nothing; a file inside it is read."""
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"item_id": "TOP-SECRET"}\n')
    catalogs = tmp_path / "catalogs"
    (catalogs / "sub").mkdir(parents=True)
    (catalogs / "sub" / "ok.jsonl").write_text('{"item_id": "new1"}\n')
    os.symlink(secret, catalogs / "link.jsonl")
    admin = {"Authorization": "Bearer right"}
    with running_server(CatalogStubEngine()) as (url, _):  # no admin token: the admin endpoints are off
        assert call(url, "/v1/catalog", {"catalog": "sub/ok.jsonl"}, headers=admin)[0] == 403
        assert call(url, "/admin/reload", {"step": 1}, headers=admin)[0] == 403
    engine = CatalogStubEngine()
    with running_server(engine, ServerSettings(admin_token="right")) as (url, _):  # no catalog directory
        assert call(url, "/v1/catalog", {"catalog": "sub/ok.jsonl"}, headers=admin)[0] == 403
    with running_server(engine, ServerSettings(admin_token="right", catalog_dir=str(catalogs))) as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "right"}):
            assert call(url, "/v1/catalog", {"catalog": "sub/ok.jsonl"}, headers=headers)[0] == 401
            assert call(url, "/admin/reload", {"step": 1}, headers=headers)[0] == 401
        for name in (str(secret), "../secret.jsonl", "sub/../../secret.jsonl", "link.jsonl", "/etc/passwd",
                     "~/x.jsonl", "", "a\x00b", ["sub/ok.jsonl"]):
            status, text, _ = call(url, "/v1/catalog", {"catalog": name}, headers=admin)
            assert status == 400 and "TOP-SECRET" not in text, (name, status, text)
        assert engine.added == []
        status, text, _ = call(url, "/v1/catalog", {"catalog": "sub/ok.jsonl"}, headers=admin)
        assert status == 200 and json.loads(text)["added"] == 1
        assert engine.added == [("sub/ok.jsonl", ["new1"])]


def test_reload_on_request_swaps_without_failing_requests_in_flight():
    engines = {1: StubEngine(1, delay_s=0.05), 2: StubEngine(2, delay_s=0.05)}

    def make(step):
        time.sleep(1.0)  # loading and compiling take a while
        return engines[step]

    with running_server(engines[1], ServerSettings(admin_token="secret"), make_engine=make) as (url, _):
        assert call(url, "/admin/reload", {"step": 2})[0] == 401
        stop, seen = threading.Event(), []

        def traffic():
            while not stop.is_set():
                status, text, _ = call(url, body={"user_id": "u"})
                seen.append((status, json.loads(text).get("checkpoint_step")))

        clients = [threading.Thread(target=traffic) for _ in range(4)]
        for c in clients:
            c.start()
        time.sleep(0.3)
        status, text, _ = call(url, "/admin/reload", {"step": 2}, headers={"Authorization": "Bearer secret"})
        assert status == 202 and json.loads(text) == {"loading": 2, "serving": 1}
        assert call(url, "/admin/reload", {"step": 2}, headers={"Authorization": "Bearer secret"})[0] == 409
        deadline = time.time() + 30
        while json.loads(call(url, "/healthz")[1])["checkpoint_step"] != 2 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        stop.set()
        for c in clients:
            c.join()
        assert all(status == 200 for status, _ in seen), seen
        steps = [step for _, step in seen]
        assert steps[0] == 1 and steps[-1] == 2 and steps == sorted(steps)  # every response names its step
        health = json.loads(call(url, "/healthz")[1])
        assert health["last_reload"]["from_step"] == 1 and health["last_reload"]["to_step"] == 2


def test_watching_the_run_folder_loads_a_newer_checkpoint(tiny_checkpoint, tmp_path):
    import homegen
    from homegen.serving.engine import PageEngine

    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_checkpoint, run_dir)
    engine = PageEngine(run_dir)
    make = lambda step: PageEngine(run_dir, step)  # noqa: E731
    with running_server(engine, ServerSettings(watch_s=0.2), make_engine=make) as (url, _):
        assert json.loads(call(url, "/healthz")[1])["checkpoint_step"] == TINY_STEPS
        cfg = homegen.config(run_dir)
        cfg.train.steps = TINY_STEPS + 2  # two more steps: a newer checkpoint appears in the run folder
        homegen.train(cfg, run_dir)
        deadline = time.time() + 120
        while json.loads(call(url, "/healthz")[1])["checkpoint_step"] != TINY_STEPS + 2 and time.time() < deadline:
            time.sleep(0.2)
        status, text, _ = call(url, body={"user_id": "u1", "num_shelves": 2})
        assert status == 200 and json.loads(text)["checkpoint_step"] == TINY_STEPS + 2


def test_sigterm_drains_requests_in_flight(tiny_checkpoint):
    port = free_port()
    server = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint, "--port", str(port),
                               "--batch_sizes", "1,8", "--beam_sizes", "4", "--sample_widths", "1"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if "serving checkpoint step" in line:
                break
        assert "compiled 4 decoding shapes" in "".join(lines), lines
        body = {"num_shelves": 6, "max_items_per_shelf": 10, "beam_size": 4}
        connections = []
        for k in range(12):  # all received before the signal: in the queue or being decoded
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/pages", json.dumps({**body, "user_id": f"u{k}"}),
                         {"Content-Type": "application/json"})
            connections.append(conn)
        deadline = time.time() + 60
        while "homegen_requests_in_flight 12.0" not in call(f"http://127.0.0.1:{port}", "/metrics")[1]:
            assert time.time() < deadline, "the requests never arrived"
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        responses = [conn.getresponse() for conn in connections]
        assert [r.status for r in responses] == [200] * 12
        assert all(json.loads(r.read())["page"] for r in responses)
        out, _ = server.communicate(timeout=120)
        # uvicorn re-raises the signal once it has drained, so the exit status says "terminated by SIGTERM".
        assert server.returncode == -signal.SIGTERM and "Traceback" not in out, out
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if server.poll() is None:  # a failed check must not leave the server running
            server.kill()
            server.wait()


def test_no_request_compiles_after_warm_up(tiny_checkpoint):
    """Every shape a request can take is compiled by warm_up: mixed beam sizes, page sizes, sampling, intents,
    exclusions and batch sizes then decode with no XLA compile at all (beam sizes are rounded up, pages go to
    the smaller of two page buffers when it holds them)."""
    import jax

    from homegen.serving.buckets import ShapeBuckets
    from homegen.serving.engine import PageEngine
    from homegen.serving.requests import parse_request
    from homegen.serving.worker import generate_isolated

    engine = PageEngine(tiny_checkpoint, buckets=ShapeBuckets(rows=(1, 4), beam_sizes=(1, 4), sample_widths=(2,),
                                                              page_shapes=((3, 10), (10, 20))))
    assert engine.warm_up()["shapes"] == 12
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        items = engine.vocab.items.item_ids
        bodies = [{"user_id": "u1", "beam_size": 3, "num_shelves": 5, "max_items_per_shelf": 7},
                  {"user_id": "u2", "beam_size": 1, "num_shelves": 1, "context": {"intent": "late night jazz " * 40}},
                  {"history": items[:30], "temperature": 0.7, "num_pages": 2, "seed": 3, "num_shelves": 3},
                  {"user_id": "u3", "exclude_items": items[:300], "beam_size": 2, "min_items_per_shelf": 2}]
        requests = [parse_request(b) for b in bodies]
        for batch in ([requests[0]], requests, requests[:3]):
            responses = generate_isolated(engine.generate, batch)
            assert all("page" in r for r in responses), responses
        assert compiles == []
        assert "at most 4" in engine.generate([parse_request({"user_id": "u", "beam_size": 8})])[0]["error"]
        # The long intent keeps at least 64 pieces (more where the history leaves room), within the one prompt
        # buffer, which is at most a training row.
        without = engine.prompt(parse_request({"user_id": "u2"}))
        assert len(without) + 64 < len(engine.prompt(requests[1])) <= engine.prompt_length <= engine.seq_len
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_a_request_decodes_in_the_first_page_buffer_that_holds_it():
    from homegen.commands.serve import page_shapes
    from homegen.serving.buckets import ShapeBuckets
    from homegen.serving.requests import PageRequest

    buckets = ShapeBuckets(page_shapes=((3, 10), (6, 5), (10, 20)))
    shape = lambda shelves, items: buckets.page_shape(PageRequest(user_id="u", num_shelves=shelves,  # noqa: E731
                                                                  max_items_per_shelf=items))
    assert [shape(2, 10), shape(4, 5), shape(4, 6), shape(10, 20)] == [(3, 10), (6, 5), (10, 20), (10, 20)]
    assert (buckets.max_shelves, buckets.max_items_per_shelf) == (10, 20)
    assert len(buckets.shapes()) == 3 * 3 * (4 + 2)  # page shapes x rows x (beam sizes + sample widths)
    for bad in ((), ((3, 10), (3, 10)), ((0, 5),), ((10, 20), (12, 5))):
        with pytest.raises(ValueError, match="page_shapes|last page shape"):
            ShapeBuckets(page_shapes=bad)
    assert page_shapes("6x10, 10x20") == ((6, 10), (10, 20))
    with pytest.raises(ValueError, match="SHELVESxITEMS .* '6 by 10'"):
        page_shapes("6 by 10")

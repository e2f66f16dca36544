"""The HTTP server (FastAPI on uvicorn): POST /v1/pages, POST /v1/events, POST /v1/catalog, POST /admin/reload,
GET /healthz, GET /metrics (Prometheus), GET / (HTML view), GET /openapi.json.

With an impressions folder, every page answered 200 is in its impression log before the answer is sent, and
POST /v1/events appends what users did with a page to the events log (serving/impressions.py). With an
experiment file, each request is served by its user's arm (serving/experiments.py), named in the response,
the impression log and /metrics; the file is re-read when it changes.

uvicorn parses HTTP (h11: a malformed Content-Length is a 400 that closes the connection), times out idle
keep-alive connections and drains in-flight requests on SIGTERM; `BodyGuard` refuses bodies over the limit
before they are read (413, connection closed, so nothing inside is parsed) and bodies that do not arrive in
time (408). Requests are decoded by one `DecodeWorker` thread in dynamic batches of fixed shapes
(`ShapeBuckets`, compiled at start-up); a full queue answers 503 with Retry-After, a request past its
deadline 504, a request that raises fails alone (500) while its batch is decoded without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from homegen.serving.catalog_files import CatalogDirectory, CatalogRefused
from homegen.serving.html import render
from homegen.serving.impressions import LogSettings, RotatingLog, impression_record, parse_events
from homegen.serving.requests import RequestError, parse_request
from homegen.serving.routing import TrafficRouter
from homegen.serving.schemas import (
    CatalogBody,
    ErrorBody,
    EventsBody,
    PageRequestBody,
    PageResponseBody,
    ReloadBody,
)
from homegen.serving.traffic import Exploration
from homegen.serving.worker import DeadlinePassed, DecodeWorker, EngineSlot, QueueFull

log = logging.getLogger("homegen.serve")
ALLOWED = "GET, HEAD, POST, OPTIONS"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    max_wait_s: float = 0.01  # how long a batch waits for more requests
    max_queue: int = 256  # requests waiting beyond it get 503
    deadline_s: float = 30.0  # a request not answered by then gets 504
    max_body: int = 1 << 20  # bytes
    client_timeout_s: float = 10.0  # a body must arrive within this
    watch_s: float = 0.0  # > 0: look for a newer checkpoint in the run folder this often
    admin_token: str | None = None  # state-changing endpoints need "Authorization: Bearer TOKEN"; off when None
    catalog_dir: str | None = None  # the only directory POST /v1/catalog reads from; off when None
    impressions_dir: str | None = None  # impression and event logs go here; off when None
    log_settings: LogSettings = LogSettings()
    log_wait_s: float = 5.0  # a response waits at most this long for its impression line to be written
    exploration: Exploration = Exploration()  # a share of beam requests sampled instead (exact propensities)
    experiment_file: str | None = None  # arms and shares (serving/experiments.py); off when None
    experiment_check_s: float = 1.0  # how often the experiment file is checked for changes


class Metrics:
    """Prometheus metrics of one server (its own registry, so that several can live in one process)."""

    def __init__(self, queue_depth, checkpoint_step):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self.requests = Counter("homegen_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("homegen_errors", "Refused or failed requests by kind", ["kind"], registry=r)
        self.latency = Histogram("homegen_request_seconds", "Latency of POST /v1/pages", registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("homegen_batch_size", "Requests per decoded batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram("homegen_batch_seconds", "Decoding time per batch", registry=r)
        self.pages = Counter("homegen_pages", "Pages served (rate() gives pages/s)", registry=r)
        self.in_flight = Gauge("homegen_requests_in_flight", "Page requests received and not yet answered",
                               registry=r)
        Gauge("homegen_queue_depth", "Requests waiting to be decoded", registry=r).set_function(queue_depth)
        Gauge("homegen_checkpoint_step", "Checkpoint step being served", registry=r).set_function(checkpoint_step)
        self.arm_pages = Counter("homegen_arm_pages", "Pages served by experiment and arm", ["experiment", "arm"],
                                 registry=r)
        self.log_records = Counter("homegen_log_records", "Impression and event records by log and result "
                                   "(written, or dropped_<errno> when the folder cannot be written)",
                                   ["log", "result"], registry=r)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


class ClientTooSlow(Exception):
    """The request body did not arrive within the client timeout."""


class BodyGuard:
    """ASGI middleware: 413 for a declared body over `max_body` (or a chunked one that grows past it) and 408
    for a body that does not arrive within `timeout_s`, each answered before the app sees the request and
    with the connection closed, so that no byte of the refused body is read as another request."""

    def __init__(self, app, max_body: int, timeout_s: float, metrics: Metrics):
        self.app, self.max_body, self.timeout_s, self.metrics = app, max_body, timeout_s, metrics

    async def _refuse(self, send, status: int, kind: str, message: str) -> None:
        self.metrics.errors.labels(kind).inc()
        self.metrics.requests.labels("any", str(status)).inc()
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_body:  # h11 has already checked it is a number
            return await self._refuse(send, 413, "too_large", f"body larger than {self.max_body} bytes")
        started, seen = False, 0

        async def guarded_receive():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise ClientTooSlow() from None
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise ClientTooSlow("too large")
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except ClientTooSlow as e:
            if started:
                raise
            if str(e) == "too large":
                return await self._refuse(send, 413, "too_large", f"body larger than {self.max_body} bytes")
            await self._refuse(send, 408, "client_timeout", f"the body did not arrive within {self.timeout_s:g} s")


def _form_request(form: dict[str, str]) -> dict:
    """A request from the HTML view's form fields."""
    request: dict = {"user_id": form.get("user_id") or "anonymous",
                     "history": [h.strip() for h in form.get("history", "").split(",") if h.strip()],
                     "context": {}}
    for key in ("hour", "device"):
        if form.get(key):
            request["context"][key] = _int_or_text(form[key]) if key == "hour" else form[key]
    if form.get("intent"):
        request["context"]["intent"] = form["intent"]
    if form.get("num_shelves"):
        request["num_shelves"] = _int_or_text(form["num_shelves"])  # not a number: a 400 that says so
    return request


def _int_or_text(text: str) -> int | str:
    """int(text) for ASCII digits ("²".isdigit() is true, but int("²") fails), else the text itself."""
    return int(text) if text.isascii() and text.isdigit() else text


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _documented(*codes: int) -> dict:
    return {code: {"model": ErrorBody} for code in codes}


async def _read_json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("body is not valid JSON: nested too deeply") from None


def _add_admin_routes(app: FastAPI, slot: EngineSlot, settings: ServerSettings, metrics: Metrics) -> None:
    """The operator's endpoints, behind the admin token: POST /v1/catalog (a file of the catalog directory)
    and POST /admin/reload."""
    catalogs = CatalogDirectory(settings.catalog_dir) if settings.catalog_dir else None

    def admin_refusal(request: Request, endpoint: str) -> JSONResponse | None:
        """None when `request` carries the admin token, else the 401 / 403 that refuses it."""
        if not settings.admin_token:
            return _error(403, f"{endpoint} is off: the server was started without an admin token "
                               "(HOMEGEN_ADMIN_TOKEN)")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.admin_token}".encode()):
            metrics.errors.labels("unauthorized").inc()
            return _error(401, f"{endpoint} needs the admin token (Authorization: Bearer ...)",
                          {"WWW-Authenticate": "Bearer"})
        return None

    @app.post("/v1/catalog", summary="Add the new items of a catalog file (semantic-ID checkpoints)",
              responses=_documented(400, 401, 403), openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": CatalogBody.model_json_schema()}}}})
    async def catalog(request: Request):
        refused = admin_refusal(request, "POST /v1/catalog")
        if refused is None and catalogs is None:
            refused = _error(403, "catalog refresh is off: the server was started without a catalog directory "
                                  "(serve.py --catalog_dir)")
        if refused is not None:
            metrics.requests.labels("/v1/catalog", str(refused.status_code)).inc()
            return refused
        try:
            obj = await _read_json(request)
            if not isinstance(obj, dict) or "catalog" not in obj:
                raise RequestError('expected {"catalog": "NAME"}, a file in the server\'s catalog directory')
            path, records = await asyncio.to_thread(catalogs.read, obj["catalog"])
            result = await asyncio.to_thread(slot.engine.add_catalog, records, str(obj["catalog"]))
        except (RequestError, CatalogRefused, ValueError) as e:
            metrics.requests.labels("/v1/catalog", "400").inc()
            return _error(400, str(e))
        log.info("catalog refresh from %s: %s", path, result)
        metrics.requests.labels("/v1/catalog", "200").inc()
        return result

    @app.post("/admin/reload", status_code=202, summary="Load a checkpoint of the run and swap it in",
              responses=_documented(400, 401, 403, 409), openapi_extra={"requestBody": {"required": False, "content": {
                  "application/json": {"schema": ReloadBody.model_json_schema()}}}})
    async def reload(request: Request):
        refused = admin_refusal(request, "POST /admin/reload")
        if refused is not None:
            return refused
        body = await request.body()
        try:
            obj = json.loads(body) if body.strip() else {}
            step = obj.get("step") if isinstance(obj, dict) else "bad"
            if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
                raise ValueError
        except (ValueError, RecursionError):
            return _error(400, 'expected {"step": N} or an empty body (the newest readable step)')
        if not slot.reload(step):
            return _error(409, "a reload is already running")
        return {"loading": step if step is not None else "newest", "serving": slot.step}


def create_app(slot: EngineSlot, settings: ServerSettings = ServerSettings(),
               arm_engine: Callable[[str], object] | None = None) -> FastAPI:
    """The ASGI app serving `slot`'s engine; its decoding worker starts now and stops (after finishing what
    is queued) when the app shuts down. `arm_engine(path)` loads (and warms up) the engine of an experiment
    arm's checkpoint; the experiment file's checkpoints are loaded before this returns."""
    metrics = Metrics(lambda: router.main.depth(), lambda: slot.step)  # read at scrape time

    def new_worker(engine_slot: EngineSlot) -> DecodeWorker:
        return DecodeWorker(engine_slot, engine_slot.engine.buckets.max_batch if engine_slot.engine.buckets else 16,
                            settings.max_wait_s, settings.max_queue, on_batch=metrics.batch)

    router = TrafficRouter(slot, new_worker, settings.experiment_file, settings.exploration, arm_engine)
    stop_watching = threading.Event()
    impressions = events = None
    if settings.impressions_dir:
        def log_in(prefix: str) -> RotatingLog:
            return RotatingLog(settings.impressions_dir, prefix, settings.log_settings,
                               on_written=lambda n: metrics.log_records.labels(prefix, "written").inc(n),
                               on_dropped=lambda n, why: metrics.log_records.labels(prefix, f"dropped_{why}").inc(n))
        impressions, events = log_in("impressions"), log_in("events")

    def watch() -> None:
        while not stop_watching.wait(settings.watch_s):
            newest = slot.newest_step()
            failed = slot.last_reload.get("error") and slot.last_reload.get("step") == newest  # not again
            if newest is not None and newest > slot.step and not slot.reloading and not failed:
                log.info("found checkpoint step %d (serving %d): loading it", newest, slot.step)
                slot.reload(newest)

    def watch_experiment() -> None:
        while not stop_watching.wait(settings.experiment_check_s):
            try:
                router.refresh()
            except Exception as e:  # a bad file or an arm that cannot load: the experiment in force stays
                metrics.errors.labels("experiment_file").inc()
                log.error("experiment file not taken (%s); %r stays in force", e, router.experiments.experiment.name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if settings.watch_s > 0:
            threading.Thread(target=watch, daemon=True, name="watch").start()
        if router.experiments is not None:
            threading.Thread(target=watch_experiment, daemon=True, name="experiment").start()
        yield
        stop_watching.set()
        await asyncio.to_thread(router.stop)
        for opened in (impressions, events):
            if opened is not None:
                await asyncio.to_thread(opened.close)

    app = FastAPI(title="homegen", summary="Generates whole Home pages from a checkpoint (FORMATS.md §4)",
                  version="1", lifespan=lifespan)
    app.add_middleware(BodyGuard, max_body=settings.max_body, timeout_s=settings.client_timeout_s, metrics=metrics)
    app.state.metrics, app.state.worker, app.state.slot = metrics, router.main, slot

    async def decode(obj) -> tuple[int, dict, dict | None]:
        """(status, body, headers) of one page request given as decoded JSON."""
        try:
            request = parse_request(obj)
            route = router.route(request.identified())
            future = route.worker.submit(route.request, settings.deadline_s)
        except RequestError as e:
            metrics.errors.labels("bad_request").inc()
            return 400, {"error": str(e)}, None
        except QueueFull as e:
            metrics.errors.labels("queue_full").inc()
            return 503, {"error": f"the server is busy ({e}); retry shortly"}, {"Retry-After": "1"}
        try:
            response = await asyncio.wait_for(asyncio.wrap_future(future), settings.deadline_s)
        except (TimeoutError, DeadlinePassed):
            future.cancel()
            metrics.errors.labels("deadline").inc()
            return 504, {"error": f"no page within the {settings.deadline_s:g} s deadline"}, None
        except Exception as e:  # a bug met by this request alone (its batch was decoded without it)
            log.exception("request failed")
            metrics.errors.labels("internal").inc()
            return 500, {"error": f"internal error while serving this request ({type(e).__name__})"}, None
        if "error" in response:  # constraints no page can meet
            metrics.errors.labels("bad_request").inc()
            return 400, response, None
        metrics.pages.inc()
        if route.arm is not None:
            response["experiment"], response["arm"] = route.experiment, route.arm
            metrics.arm_pages.labels(route.experiment, route.arm).inc()
        if impressions is not None:
            await log_impression(route.request, response)
        return 200, response, None

    async def log_impression(request, response: dict) -> None:
        """Returns once the page's impression line is written (or dropped and counted: a log that cannot be
        written never fails the request), or after log_wait_s, whichever comes first."""
        written = impressions.append(impression_record(request.with_session(), response))
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(written)), settings.log_wait_s)
        except TimeoutError:
            metrics.log_records.labels("impressions", "slow").inc()


    @app.post("/v1/pages", summary="Generate a page", response_model=PageResponseBody,
              responses=_documented(400, 408, 413, 500, 503, 504),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": PageRequestBody.model_json_schema()}}}})
    async def pages(request: Request):
        start = time.perf_counter()
        with metrics.in_flight.track_inprogress():
            try:
                obj = await _read_json(request)
            except RequestError as e:
                status, body, headers = 400, {"error": str(e)}, None
                metrics.errors.labels("bad_request").inc()
            else:
                status, body, headers = await decode(obj)
        metrics.requests.labels("/v1/pages", str(status)).inc()
        metrics.latency.observe(time.perf_counter() - start)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.post("/v1/events", status_code=202, summary="Record what a user did with a served page",
              responses=_documented(400, 403), openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": EventsBody.model_json_schema()}}}})
    async def outcome_events(request: Request):
        if events is None:
            metrics.requests.labels("/v1/events", "403").inc()
            return _error(403, "event logging is off: the server was started without an impressions folder "
                               "(serve.py --impressions)")
        try:
            records = parse_events(await _read_json(request))
        except ValueError as e:  # RequestError included
            metrics.requests.labels("/v1/events", "400").inc()
            return _error(400, str(e))
        written = asyncio.gather(*(asyncio.wrap_future(events.append(record)) for record in records))
        try:
            await asyncio.wait_for(asyncio.shield(written), settings.log_wait_s)
        except TimeoutError:  # queued, and written when the folder allows
            metrics.log_records.labels("events", "slow").inc()
        metrics.requests.labels("/v1/events", "202").inc()
        return JSONResponse({"accepted": sum(len(r["events"]) for r in records)}, status_code=202)

    _add_admin_routes(app, slot, settings, metrics)

    @app.get("/healthz", summary="Liveness and the step being served")
    @app.head("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok", "checkpoint_step": slot.step, "reloading": slot.reloading,
                **({"last_reload": slot.last_reload} if slot.last_reload else {}),
                **router.describe()}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, summary="HTML view")
    @app.head("/", include_in_schema=False)
    async def view(request: Request):
        form = dict(request.query_params)
        response = None
        if form:
            status, response, _ = await decode(_form_request(form))
            metrics.requests.labels("/", str(status)).inc()
        return HTMLResponse(render(form, response, slot.engine.describe))

    async def options():
        return Response(status_code=204, headers={"Allow": ALLOWED})

    for path in ("/v1/pages", "/v1/events", "/v1/catalog", "/admin/reload", "/healthz", "/metrics", "/"):
        app.add_api_route(path, options, methods=["OPTIONS"], include_in_schema=False)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return _error(404, f"no such path {request.url.path}")

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return _error(405, f"{request.method} is not allowed on {request.url.path}", {"Allow": ALLOWED})

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        metrics.errors.labels("internal").inc()
        return _error(500, f"internal error ({type(exc).__name__})")

    return app

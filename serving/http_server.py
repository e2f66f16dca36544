"""The HTTP JSON API and HTML view: POST /v1/pages, POST /v1/catalog (add new items from a catalog file),
GET /healthz, GET / (form + page)."""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from homegen.serving.batcher import Batcher
from homegen.serving.html import render
from homegen.serving.requests import RequestError, parse_request

MAX_BODY = 1 << 20
log = logging.getLogger("homegen.serve")


def _form_request(form: dict[str, str]) -> dict:
    request: dict = {"user_id": form.get("user_id") or "anonymous",
                     "history": [h.strip() for h in form.get("history", "").split(",") if h.strip()],
                     "context": {}}
    for key in ("hour", "device"):
        if form.get(key):
            request["context"][key] = int(form[key]) if key == "hour" and form[key].isdigit() else form[key]
    if form.get("intent"):
        request["context"]["intent"] = form["intent"]
    if form.get("num_shelves", "").isdigit():
        request["num_shelves"] = int(form["num_shelves"])
    return request


def make_server(engine, host: str, port: int, max_batch: int = 16, max_wait_s: float = 0.01) -> ThreadingHTTPServer:
    batcher = Batcher(engine.generate, max_batch, max_wait_s)

    def serve_one(obj) -> dict:
        request = parse_request(obj)
        response = batcher.submit(request).result()
        stats = response.pop("_stats", None)
        if stats:
            log.info("user=%s latency=%.3fs tokens=%d batch=%d", request.user_id, stats["latency_s"],
                     stats["tokens"], stats["batch_size"])
        return response

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # requests are logged with their latency instead
            pass

        def _send(self, code: int, body: str, content_type: str = "application/json") -> None:
            data = body.encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, code: int, obj: dict) -> None:
            self._send(code, json.dumps(obj))

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/healthz":
                return self._json(200, {"status": "ok", "checkpoint_step": engine.step})
            if url.path != "/":
                return self._json(404, {"error": f"no such path {url.path}"})
            form = {k: v[0] for k, v in parse_qs(url.query).items()}
            response = None
            if form:
                try:
                    response = serve_one(_form_request(form))
                except RequestError as e:
                    response = {"error": str(e)}
            self._send(200, render(form, response, engine.describe), "text/html")

        def do_POST(self):
            path = urlparse(self.path).path
            if path not in ("/v1/pages", "/v1/catalog"):
                return self._json(404, {"error": f"no such path {self.path}"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                return self._json(400, {"error": "bad Content-Length"})
            if length > MAX_BODY:
                return self._json(413, {"error": f"body larger than {MAX_BODY} bytes"})
            body = self.rfile.read(length)
            try:
                obj = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return self._json(400, {"error": f"body is not valid JSON: {e}"})
            if path == "/v1/catalog":
                return self._refresh_catalog(obj)
            try:
                response = serve_one(obj)
            except RequestError as e:
                return self._json(400, {"error": str(e)})
            self._json(400 if "error" in response else 200, response)

        def _refresh_catalog(self, obj) -> None:
            """POST /v1/catalog {"catalog": PATH}: adds the new items of a catalog file on the server."""
            if not isinstance(obj, dict) or not isinstance(obj.get("catalog"), str):
                return self._json(400, {"error": 'expected {"catalog": "path of a catalog JSON Lines file"}'})
            try:
                result = engine.refresh_catalog(obj["catalog"])
            except (ValueError, OSError) as e:
                return self._json(400, {"error": str(e)})
            log.info("catalog refresh from %s: %s", obj["catalog"], result)
            self._json(200, result)

        def do_PUT(self):
            self._json(405, {"error": "use POST /v1/pages or GET /"})

        do_DELETE = do_PATCH = do_PUT

    return ThreadingHTTPServer((host, port), Handler)

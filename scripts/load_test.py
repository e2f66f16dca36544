"""Load and fuzz harness for a running `serve.py --port` server: concurrent valid traffic, hostile requests
beside it, 1,000 idle connections, and a checkpoint swap half-way through.

    python serve.py --checkpoint RUN --port 8080 &
    python scripts/load_test.py --url http://127.0.0.1:8080 [--valid 10000 --hostile 2000 --clients 32] \
        [--swap_to STEP]

Prints status-code counts for valid and hostile traffic (by kind), empty replies (the connection closed with
no answer) and hangs (no answer within --timeout), pages/s, latency percentiles of valid requests (all, and
away from the swap), the checkpoint steps that answered before and after the swap, and the server's resident
memory (from /metrics) before and after. Exits 1 when a valid request went unanswered, a reply was empty, a
request hung, or the server answered 5xx other than 503.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request

import numpy as np


def _raw(host: str, port: int, data: bytes, timeout: float) -> str:
    """Sends raw bytes; the status code of the answer, 'empty' if the server closed without one, 'hang' if
    none came in time."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(data)
            answer = b""
            while b"\r\n" not in answer:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except TimeoutError:
        return "hang"
    except (ConnectionResetError, BrokenPipeError):
        answer = b""
    if not answer.startswith(b"HTTP/1.1 "):
        return "empty"
    return answer[9:12].decode()


def _post(path: str, body: bytes, headers: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


REFUSED_ADMIN = ("catalog without token", "catalog with a wrong token", "catalog absolute path",
                 "catalog path traversal", "reload without token")  # must never be answered 2xx


def hostile_requests(rng: random.Random, admin_token: str | None = None) -> list[tuple[str, bytes]]:
    """(kind, raw request) pairs: malformed HTTP, oversized or invalid bodies, hostile field values, admin calls
    without (or with a wrong) token, catalog names leading out of the server's catalog directory."""
    def page(obj) -> bytes:
        return _post("/v1/pages", json.dumps(obj).encode())

    admin = f"Authorization: Bearer {admin_token}\r\n" if admin_token else ""  # traversal must fail even with it
    big = b"x" * ((1 << 20) + 10)
    hidden = _post("/v1/pages", b'{"user_id": "smuggled"}')
    kinds = {
        "lone surrogate intent": lambda: page({"user_id": "u", "context": {"intent": "\ud800"}}),
        "10,000-character intent": lambda: page({"user_id": "u", "context": {"intent": "jazz " * 2000}}),
        "900 KB intent": lambda: page({"user_id": "u", "context": {"intent": "a" * 900_000}}),
        "body over 1 MB hiding a request": lambda: (b"POST /v1/pages HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                                    + str(len(big) + len(hidden)).encode() + b"\r\n\r\n" + hidden),
        "Content-Length -1": lambda: b"POST /v1/pages HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        "two Content-Lengths": lambda: (b"POST /v1/pages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                        b"Content-Length: 40\r\n\r\n{}"),
        "deeply nested JSON": lambda: _post("/v1/pages", b"[" * 200_000 + b"]" * 200_000),
        "invalid JSON": lambda: _post("/v1/pages", b'{"user_id": "u",'),
        "not UTF-8": lambda: _post("/v1/pages", b'{"user_id": "caf\xe9"}'),
        "NUL bytes": lambda: _post("/v1/pages", b'{"user_id": "\x00\x00"}'),
        "wrong types": lambda: page(rng.choice([{"user_id": ["u"]}, {"user_id": "u", "num_shelves": "six"},
                                                {"user_id": "u", "context": [1]}, [1, 2], "text", None,
                                                {"user_id": "u", "beam_size": 1e308}, {"user_id": True}])),
        "out-of-range numbers": lambda: page({"user_id": "u", rng.choice(["num_shelves", "beam_size", "num_pages",
                                                                          "max_items_per_shelf", "seed"]): -5}),
        "huge lists": lambda: page({"user_id": "u", rng.choice(["history", "exclude_items"]): ["t1"] * 10_001}),
        "beam wider than served": lambda: page({"user_id": "u", "beam_size": 16}),
        "impossible page": lambda: page({"user_id": "u", "allowed_shelves": ["no_such_shelf"]}),
        "garbage request line": lambda: bytes(rng.getrandbits(8) for _ in range(64)) + b"\r\n\r\n",
        "header too large": lambda: b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        "superscript digit in form": lambda: b"GET /?user_id=u&num_shelves=%C2%B2 HTTP/1.1\r\nHost: x\r\n\r\n",
        "HTML in form": lambda: b"GET /?user_id=%3Cscript%3Ealert(1)%3C/script%3E HTTP/1.1\r\nHost: x\r\n\r\n",
        "other methods": lambda: rng.choice([b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"])
        + b" /v1/pages HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "unknown path": lambda: _post("/v2/" + "x" * rng.randint(1, 2000), b"{}"),
        "bad admin reload": lambda: _post("/admin/reload", b'{"step": "latest"}'),
        "catalog without token": lambda: _post("/v1/catalog", b'{"catalog": "catalog.jsonl"}'),
        "catalog with a wrong token": lambda: _post("/v1/catalog", b'{"catalog": "catalog.jsonl"}',
                                                    "Authorization: Bearer wrong\r\n"),
        "catalog absolute path": lambda: _post("/v1/catalog", b'{"catalog": "/etc/passwd"}', admin),
        "catalog path traversal": lambda: _post("/v1/catalog", b'{"catalog": "../../../../etc/passwd"}', admin),
        "reload without token": lambda: _post("/admin/reload", b'{"step": 1}'),
        "short body (client goes quiet)": lambda: b"POST /v1/pages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    }
    return [(kind, make()) for kind, make in kinds.items()]


def valid_request(rng: random.Random) -> dict:
    """A request the server must answer with a page: mixed users, page shapes and decoding modes."""
    request = {"user_id": f"u{rng.randrange(200)}", "num_shelves": rng.randint(1, 6),
               "max_items_per_shelf": rng.randint(4, 10), "min_items_per_shelf": rng.randint(1, 4),
               "context": {"hour": rng.randrange(24), "device": rng.choice(["mobile", "desktop", "tv"])}}
    if rng.random() < 0.3:
        request["context"]["intent"] = rng.choice(["chill evening", "workout", "focus music", "party"])
    if rng.random() < 0.25:
        request.update(temperature=0.8, seed=rng.randrange(1000), num_pages=rng.choice([1, 2]))
    else:
        request["beam_size"] = rng.choice([1, 2, 4])
    return request


def resident_memory(url: str) -> float | None:
    """The server's resident memory in MiB, from its /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("process_resident_memory_bytes "):
                return float(line.split()[1]) / 2**20
    return None


class Tally:
    """Thread-safe counts and latencies."""

    def __init__(self):
        self.lock = threading.Lock()
        self.valid: collections.Counter = collections.Counter()
        self.hostile: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.latencies: list[tuple[float, float]] = []  # (finished at, seconds)
        self.steps: collections.Counter = collections.Counter()  # (before/after swap, step)
        self.unanswered = 0


def run_valid(url: str, count: int, clients: int, timeout: float, tally: Tally, swap: dict,
              admin_token: str | None) -> None:
    parts = urllib.parse.urlsplit(url)
    remaining = iter(range(count))
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        while True:
            with lock:
                k = next(remaining, None)
            if k is None:
                break
            body = json.dumps(valid_request(rng))
            for _ in range(50):  # a deliberate 503 is retried after its Retry-After
                start = time.perf_counter()
                try:
                    conn.request("POST", "/v1/pages", body, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    data = response.read()
                    status = str(response.status)
                except TimeoutError:
                    status, data = "hang", b""
                    conn.close()
                except (http.client.HTTPException, ConnectionError):
                    status, data = "empty", b""
                    conn.close()
                elapsed = time.perf_counter() - start
                with tally.lock:
                    tally.valid[status] += 1
                if status != "503":
                    break
                time.sleep(float(response.getheader("Retry-After", "1")))
            with tally.lock:
                if status == "200":
                    tally.latencies.append((time.time(), elapsed))
                    phase = "after" if swap.get("done_at") and time.time() > swap["done_at"] else (
                        "during" if swap.get("asked_at") else "before")
                    tally.steps[(phase, json.loads(data)["checkpoint_step"])] += 1
                else:
                    tally.unanswered += 1
            if k == count // 2 and swap.get("to") is not None:
                swap_checkpoint(url, swap, admin_token)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def swap_checkpoint(url: str, swap: dict, admin_token: str | None) -> None:
    """POST /admin/reload, then wait (in this client thread) until /healthz serves the new step."""
    swap["asked_at"] = time.time()
    request = urllib.request.Request(url + "/admin/reload", json.dumps({"step": swap["to"]}).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {admin_token}"} if admin_token else {})
    with urllib.request.urlopen(request, timeout=30) as r:
        swap["answer"] = json.loads(r.read())
    while True:
        with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
            health = json.loads(r.read())
        if not health["reloading"]:
            break
        time.sleep(0.2)
    swap["done_at"], swap["health"] = time.time(), health


def run_hostile(url: str, count: int, clients: int, timeout: float, tally: Tally, admin_token: str | None) -> None:
    parts = urllib.parse.urlsplit(url)
    remaining = iter(range(count))
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(10_000 + seed)
        while True:
            with lock:
                k = next(remaining, None)
            if k is None:
                break
            kinds = hostile_requests(rng, admin_token)
            kind, data = kinds[k % len(kinds)]
            status = _raw(parts.hostname, parts.port, data, timeout)
            with tally.lock:
                tally.hostile[kind][status] += 1

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--valid", type=int, default=10_000)
    parser.add_argument("--hostile", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=32, help="concurrent valid clients")
    parser.add_argument("--hostile_clients", type=int, default=8)
    parser.add_argument("--idle", type=int, default=1_000, help="idle connections held open throughout")
    parser.add_argument("--swap_to", type=int, default=None, help="checkpoint step to swap in half-way")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as hung")
    parser.add_argument("--admin_token", default=os.environ.get("HOMEGEN_ADMIN_TOKEN"),
                        help="the server's admin token (default: HOMEGEN_ADMIN_TOKEN): --swap_to needs it, and the "
                             "traversal cases send it so that only the catalog directory check stands in their way")
    args = parser.parse_args(argv)
    parts = urllib.parse.urlsplit(args.url)

    memory_before = resident_memory(args.url)
    idle = [socket.create_connection((parts.hostname, parts.port)) for _ in range(args.idle)]
    tally, swap = Tally(), {"to": args.swap_to}
    start = time.time()
    hostile = threading.Thread(target=run_hostile, args=(args.url, args.hostile, args.hostile_clients, args.timeout,
                                                          tally, args.admin_token))
    hostile.start()
    run_valid(args.url, args.valid, args.clients, args.timeout, tally, swap, args.admin_token)
    valid_seconds = time.time() - start
    hostile.join()
    for s in idle:
        s.close()
    memory_after = resident_memory(args.url)

    print(f"valid: {args.valid:,} requests from {args.clients} clients in {valid_seconds:.0f} s "
          f"({sum(tally.valid[s] for s in ('200',)) / valid_seconds:.1f} pages/s); status counts "
          f"{dict(sorted(tally.valid.items()))}; unanswered {tally.unanswered}")
    latencies = [s for _, s in tally.latencies]
    away = [s for t, s in tally.latencies
            if not swap.get("asked_at") or not swap["asked_at"] - 5 <= t <= swap.get("done_at", t) + 5]
    for name, values in (("all", latencies), ("away from the swap", away)):
        p50, p99 = percentile(values, 50), percentile(values, 99)
        print(f"latency ({name}, {len(values):,}): p50 {p50:.3f} s, p90 {percentile(values, 90):.3f} s, "
              f"p99 {p99:.3f} s, max {max(values, default=float('nan')):.3f} s; p99/p50 {p99 / p50:.2f}")
    if swap.get("to") is not None:
        print(f"swap: asked at +{swap['asked_at'] - start:.0f} s, served from +{swap['done_at'] - start:.0f} s "
              f"({swap['done_at'] - swap['asked_at']:.1f} s); {swap['health'].get('last_reload')}")
        print(f"steps that answered: {dict(sorted(tally.steps.items()))}")
    hostile_total = collections.Counter()
    print(f"hostile: {sum(sum(c.values()) for c in tally.hostile.values()):,} requests from {args.hostile_clients} "
          f"clients, by kind:")
    for kind, counts in sorted(tally.hostile.items()):
        hostile_total.update(counts)
        print(f"  {kind:<36} {dict(sorted(counts.items()))}")
    print(f"hostile status counts: {dict(sorted(hostile_total.items()))}")
    print(f"idle connections held: {args.idle:,}")
    print(f"server resident memory: {memory_before:.0f} MiB before, {memory_after:.0f} MiB after")
    every = collections.Counter(tally.valid) + hostile_total
    bad = {s: n for s, n in every.items() if s in ("empty", "hang") or (s.startswith("5") and s != "503")}
    admitted = {kind: n for kind in REFUSED_ADMIN for status, n in tally.hostile[kind].items() if status.startswith("2")}
    if tally.unanswered or bad or admitted:
        print(f"FAILED: unanswered valid requests {tally.unanswered}, {bad}; admin calls let through {admitted}")
        return 1
    print("OK: every valid request answered; no empty reply, no hang, no 5xx but deliberate 503s; every admin call "
          "without the token or naming a path outside the catalog directory refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())

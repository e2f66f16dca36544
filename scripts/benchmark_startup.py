"""Start-up of `serve.py --port` on a checkpoint, as an operator meets it: the wall time from launching the
server to its first answer on /healthz (checkpoint load, vocabulary, grammar tables, every decoding shape
compiled), the server's resident memory, then the latency of requests of a requests file sent one at a time
over HTTP, each page checked afterwards by `serving/validity.py`'s `PageValidator` (eligibility judged item by
item from the checkpoint's spec, not from the decoder's masks).

    python scripts/benchmark_startup.py --checkpoint RUN --requests REQUESTS.jsonl [--count 20] [-- SERVE FLAGS]

Anything after `--` goes to serve.py (e.g. `--batch_sizes 1,4`). Exit status 1 when the server does not come up, a
request fails or a page breaks a rule.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    """The process's current and peak resident memory (VmRSS, VmHWM) in KiB, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def wait_until_ready(url: str, server: subprocess.Popen, timeout: float) -> float:
    """Seconds until GET /healthz answers 200; RuntimeError if the server exits or `timeout` passes."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def post_page(url: str, request: dict) -> tuple[float, dict]:
    """(seconds, decoded response) of one POST /v1/pages; an HTTP error's body is the response."""
    body = json.dumps(request).encode()
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/pages", body, {"Content-Type":
                                                           "application/json"}), timeout=600) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        answer = {"error": f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"}
    return time.perf_counter() - start, answer


def page_violations(checkpoint: str, requests: list[dict], answers: list[dict]) -> dict[int, list[str]]:
    """The rules each served page breaks (by request index; answers that are errors are skipped), judged by
    `PageValidator` from the checkpoint's own metadata."""
    from homegen.data.vocab import Vocabulary
    from homegen.serving.requests import parse_request
    from homegen.serving.validity import PageValidator
    from homegen.training.checkpoints import Checkpoints, checkpoint_dir

    _, meta = Checkpoints(checkpoint_dir(checkpoint), read_only=True).read_meta()
    validator = PageValidator(Vocabulary.from_json(meta["vocab"]), meta.get("eligibility") or {"kind": "all"})
    problems = {}
    for k, (request, answer) in enumerate(zip(requests, answers)):
        if "error" not in answer:
            page = [{"shelf": s["shelf"], "items": s["items"]} for s in answer["page"]]
            problems[k] = validator.violations(parse_request(request), page)
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder")
    parser.add_argument("--requests", required=True, help="JSON Lines of page requests (FORMATS.md §4)")
    parser.add_argument("--count", type=int, default=20, help="requests sent, one at a time")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds the server may take to start")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    with open(args.requests, encoding="utf-8") as f:
        requests = [json.loads(line) for line, _ in zip(f, range(args.count))]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    command = [sys.executable, os.path.join(ROOT, "serve.py"), "--checkpoint", args.checkpoint, "--host",
               "127.0.0.1", "--port", str(port), *serve_flags]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        try:
            ready = wait_until_ready(url, server, args.timeout)
        except RuntimeError as e:
            log.seek(0)
            print(f"{e}; its output ends:\n{log.read()[-3000:]}", file=sys.stderr)
            return 1
        at_ready = memory_kib(server.pid)
        timed = [post_page(url, r) for r in requests]
        after = memory_kib(server.pid)
        log.seek(0)
        compiled = [line.strip() for line in log if line.startswith("compiled ")]
    finally:
        server.terminate()
        server.wait(timeout=120)
        log.close()
        os.unlink(log.name)
    seconds = np.array([t for t, _ in timed])
    answers = [a for _, a in timed]
    errors = [f"request {k}: {a['error']}" for k, a in enumerate(answers) if "error" in a]
    problems = page_violations(args.checkpoint, requests, answers)
    valid = sum(not p for p in problems.values())
    problems_listed = [f"request {k}: {p}" for k, found in problems.items() for p in found]
    print(f"| checkpoint | {args.checkpoint} |\n| --- | --- |")
    print(f"| start-up to the first 200 on /healthz (load + compile) | {ready:.1f} s |")
    if compiled:
        print(f"| ... of which compiling | {compiled[0]} |")
    print(f"| server RSS when ready / after the requests / peak | {at_ready['VmRSS'] / 2**20:.2f} / "
          f"{after['VmRSS'] / 2**20:.2f} / {after['VmHWM'] / 2**20:.2f} GiB |")
    print(f"| {len(requests)} requests one at a time: p50 / p99 / first | {np.percentile(seconds, 50) * 1e3:.0f} / "
          f"{np.percentile(seconds, 99) * 1e3:.0f} / {seconds[0] * 1e3:.0f} ms |")
    print(f"| pages valid under PageValidator | {valid} of {len(answers)} ({len(errors)} errors) |")
    for line in (errors + problems_listed)[:20]:
        print("  " + line)
    return 1 if errors or problems_listed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Samples Home pages from a checkpoint: one page in the terminal, a batch file, or an HTTP server.

    python serve.py --checkpoint RUN --user u42 [--history t1,t2] [--context hour=8,device=mobile]
    python serve.py --checkpoint RUN --requests IN.jsonl --output OUT.jsonl
    python serve.py --checkpoint RUN --port 8080 [--watch_s 10]   # HTTP: POST /v1/pages, GET / (HTML),
        # /healthz, /metrics, /openapi.json, POST /admin/reload
    ... [--impressions LOGS]   # every page served is logged there (and POST /v1/events' outcomes); then
    homegen join --impressions LOGS --output pages.jsonl          # page logs to train on and evaluate with

--step picks a checkpoint step (default: the newest readable one; a damaged newer step is skipped with a
warning). Requests follow FORMATS.md §4.

Exit status: 0 when every page was served; 1 when a request failed (batch mode: any line got an error
object; every line still gets its response and a one-line summary goes to stderr); 2 for bad arguments or a
checkpoint that cannot be read. The HTTP server runs until SIGTERM or Ctrl-C, answers the requests it has
received, then ends as terminated by that signal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from homegen.commands.search_flags import add_search_flags, search_overrides


def _read_requests(path: str):
    """(line number, parsed request or error text) for every non-empty line."""
    from homegen.serving.requests import RequestError, parse_request

    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield number, parse_request(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError as e:
                yield number, f"not UTF-8 text (byte {e.start + 1})"
            except json.JSONDecodeError as e:
                yield number, f"invalid JSON ({e.msg} at column {e.colno})"
            except RecursionError:
                yield number, "invalid JSON (nested too deeply)"
            except RequestError as e:
                yield number, str(e)


def run_batch(engine, path: str, output: str, batch_size: int, impressions=None,
              exploration=None) -> list[tuple[int, str]]:
    """Writes one response per request line, in order; bad lines get {"error", "line"}, and so does a line
    whose request raises while decoding (the rest of its batch is decoded without it). Every request gets a
    request id (its own, else a new one); with `impressions` (a RotatingLog) each page served is logged; with
    `exploration` (serving/traffic.py) its share of beam requests is sampled instead. Returns the (line,
    error) of every failed line."""
    from homegen.serving.impressions import impression_record
    from homegen.serving.worker import generate_isolated

    errors: list[tuple[int, str]] = []
    with open(output, "w", encoding="utf-8") as out:
        pending: list[tuple[int, object]] = []

        def flush():
            good = [(n, r) for n, r in pending if not isinstance(r, str)]
            responses = iter(generate_isolated(engine.generate, [r for _, r in good]) if good else [])
            for number, request in pending:
                response = {"error": request} if isinstance(request, str) else next(responses)
                if isinstance(response, Exception):  # a bug met by this line alone: report it, go on
                    response = {"error": f"internal error while serving this request: {type(response).__name__}"}
                if "error" in response:
                    response["line"] = number
                    errors.append((number, response["error"]))
                elif impressions is not None:
                    impressions.append(impression_record(request.with_session(), response))
                out.write(json.dumps(response) + "\n")
            pending.clear()

        for number, request in _read_requests(path):
            if not isinstance(request, str):
                request = exploration.apply(request.identified()) if exploration else request.identified()
            pending.append((number, request))
            if len(pending) >= batch_size:
                flush()
        flush()
    return errors


def serve_http(engine, args) -> int:
    """Compiles the server's decoding shapes, then serves HTTP until SIGTERM/Ctrl-C (in-flight requests are
    finished first)."""
    import socket
    import time

    import uvicorn

    from homegen.serving.app import ServerSettings, create_app
    from homegen.serving.engine import PageEngine
    from homegen.serving.worker import EngineSlot

    def warmed(engine):
        shapes = engine.warm_up()
        print(f"compiled {shapes['shapes']} decoding shapes of step {engine.step} in {shapes['seconds']:.1f} s",
              flush=True)
        return engine

    start = time.perf_counter()
    warmed(engine)
    slot = EngineSlot(engine, lambda step: warmed(PageEngine(args.checkpoint, step, objective=args.objective,
                                                             buckets=engine.buckets, **engine.search_settings)))
    settings = ServerSettings(max_queue=args.max_queue, deadline_s=args.deadline_s, watch_s=args.watch_s,
                              admin_token=os.environ.get("HOMEGEN_ADMIN_TOKEN") or None, catalog_dir=args.catalog_dir,
                              impressions_dir=args.impressions, log_settings=log_settings(args),
                              exploration=exploration(args), experiment_file=args.experiment)
    app = create_app(slot, settings, arm_engine=lambda path: warmed(PageEngine(
        path, objective=args.objective, buckets=engine.buckets, **search_overrides(args))))
    # Python's own asyncio loop rather than uvloop (which orbax installs): the loop is not this server's
    # bottleneck (decoding is), and it keeps libuv's native signal handling out of a process that runs JAX.
    config = uvicorn.Config(app, log_level="warning", http="h11", loop="asyncio", timeout_keep_alive=5,
                            timeout_graceful_shutdown=args.deadline_s, limit_concurrency=args.max_connections,
                            h11_max_incomplete_event_size=64 * 1024)
    listener = socket.create_server((args.host, args.port), backlog=2048)  # bound before we say we serve
    print(f"serving checkpoint step {engine.step} on http://{args.host}:{listener.getsockname()[1]} "
          f"(ready {time.perf_counter() - start:.1f} s after loading)", flush=True)
    uvicorn.Server(config).run(sockets=[listener])
    return 0


def page_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """"6x10,10x20" -> ((6, 10), (10, 20)); ValueError naming a malformed shape."""
    shapes = []
    for part in text.split(","):
        shelves, _, items = part.strip().partition("x")
        if not (shelves.isdigit() and items.isdigit()):
            raise ValueError(f"a page shape is SHELVESxITEMS (e.g. 6x10), got {part.strip()!r}")
        shapes.append((int(shelves), int(items)))
    return tuple(shapes)


def exploration(args):
    from homegen.serving.traffic import Exploration

    return Exploration(args.explore_share, args.explore_temperature, args.explore_top_p)


def log_settings(args):
    from homegen.serving.impressions import LogSettings

    return LogSettings(max_bytes=int(args.log_max_mb * 2**20), max_age_s=args.log_max_age_s, fsync_s=args.log_fsync_s,
                       keep_files=args.log_keep_files)


def print_page(engine, response: dict) -> None:
    from homegen.data.simulator.shelves import SHELF_TITLES

    streams = f", {response['predicted_streams']:.2f} predicted streams" if "predicted_streams" in response else ""
    print(f"Home page for {response['user_id']} (checkpoint step {response['checkpoint_step']}, "
          f"log p = {response['log_prob']:.2f}{streams})")
    for shelf in response["page"]:
        print(f"\n  {SHELF_TITLES.get(shelf['shelf'], shelf['shelf'])}")
        for item in shelf["items"]:
            info = engine.describe(item)
            text = f"{info.get('title') or item}" + (f" — {info['artist']}" if info.get("artist") else "")
            print(f"    {item:>8}  {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder or its checkpoints/ folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--user", default=None)
    parser.add_argument("--history", default="", help="comma-separated item ids, oldest first")
    parser.add_argument("--context", default="", help="key=value pairs, comma-separated")
    parser.add_argument("--intent", default=None)
    parser.add_argument("--beam_size", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--objective", default="auto", choices=("auto", "likelihood", "streams"),
                        help="what beam search maximises: the page's log-probability, or its streams as the "
                             "value head predicts them (auto: streams when the checkpoint has a value head)")
    add_search_flags(parser)
    parser.add_argument("--requests", default=None, help="JSON Lines of requests (batch mode)")
    parser.add_argument("--output", default=None, help="where batch mode writes responses")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--port", type=int, default=None, help="serve HTTP on this port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--batch_sizes", default="1,4,16",
                        help="HTTP: batch sizes compiled at start-up (the last is the largest batch)")
    parser.add_argument("--beam_sizes", default="1,2,4,8", help="HTTP: beam sizes compiled at start-up (rounded up to)")
    parser.add_argument("--sample_widths", default="1,4", help="HTTP: pages sampled per request (num_pages rounded up)")
    parser.add_argument("--page_shapes", default="10x20",
                        help="HTTP: page buffers compiled at start-up, SHELVESxITEMS, smallest first; a request decodes "
                             "in the first that holds its page, and the last is the largest page allowed (e.g. "
                             "6x10,10x20: a 6 x 10 page then decodes 1.55x faster than in a 10 x 20 buffer; each "
                             "shape is compiled once more)")
    parser.add_argument("--intent_tokens", type=int, default=64,
                        help="HTTP: intent pieces the prompt buffer holds beside the longest history (a longer "
                             "intent is cut); every decoding step attends to the whole buffer")
    parser.add_argument("--max_queue", type=int, default=256, help="HTTP: requests waiting beyond it get 503")
    parser.add_argument("--deadline_s", type=float, default=30.0, help="HTTP: a request not answered by then gets 504")
    parser.add_argument("--max_connections", type=int, default=2048, help="HTTP: more get 503")
    parser.add_argument("--watch_s", type=float, default=0.0,
                        help="HTTP: look for a newer checkpoint in the run folder this often and swap it in (0: off; "
                             "POST /admin/reload does it on demand, with HOMEGEN_ADMIN_TOKEN as its bearer token; "
                             "without that variable the admin endpoints answer 403)")
    parser.add_argument("--catalog", default=None,
                        help="catalog JSON Lines whose new items (e.g. releases since training) are added before "
                             "serving, without retraining (semantic-ID checkpoints; POST /v1/catalog does it live)")
    parser.add_argument("--catalog_dir", default=None,
                        help="HTTP: the only directory POST /v1/catalog reads catalog files from (clients name a file "
                             "in it; needs HOMEGEN_ADMIN_TOKEN); without it catalog refresh over HTTP is off")
    parser.add_argument("--impressions", default=None,
                        help="log every page served (batch and HTTP) to impressions-*.jsonl in this folder, and "
                             "POST /v1/events' outcomes to events-*.jsonl; `homegen join` makes page logs of them")
    parser.add_argument("--log_max_mb", type=float, default=64.0, help="rotate a log file before it passes this size")
    parser.add_argument("--log_max_age_s", type=float, default=3600.0, help="rotate a log file at this age")
    parser.add_argument("--log_fsync_s", type=float, default=1.0,
                        help="fsync the open log file at most this long after a write (0: after every write); "
                             "lines are written to the OS before the page's response is sent either way")
    parser.add_argument("--log_keep_files", type=int, default=0, help="> 0: keep only the newest this many files per log")
    parser.add_argument("--experiment", default=None,
                        help="HTTP: a JSON file of experiment arms and traffic shares (serving/experiments.py); each "
                             "user's arm is chosen by a salted hash, named in responses, logs and /metrics; the file "
                             "is re-read when it changes")
    parser.add_argument("--explore_share", type=float, default=0.0,
                        help="share of beam-search requests (chosen by a hash of the request id) served by sampling "
                             "instead, with exact propensities in the impression log (serving/traffic.py)")
    parser.add_argument("--explore_temperature", type=float, default=1.0, help="the exploring sampler's temperature")
    parser.add_argument("--explore_top_p", type=float, default=1.0, help="the exploring sampler's nucleus")
    args = parser.parse_args(argv)
    if min(args.log_max_mb, args.log_max_age_s) <= 0 or args.log_fsync_s < 0 or args.log_keep_files < 0:
        parser.error("--log_max_mb and --log_max_age_s must be > 0; --log_fsync_s and --log_keep_files >= 0")
    try:
        exploration(args)
    except ValueError as e:
        parser.error(str(e))
    if args.experiment is not None:
        from homegen.serving.experiments import read_experiment

        if args.port is None:
            parser.error("--experiment splits HTTP traffic: it needs --port")
        try:
            read_experiment(args.experiment)
        except ValueError as e:
            parser.error(str(e))
    if args.catalog_dir is not None and not os.path.isdir(args.catalog_dir):
        parser.error(f"--catalog_dir {args.catalog_dir} is not a directory")
    if args.requests and not args.output:
        parser.error("--requests needs --output")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    from homegen.serving.buckets import ShapeBuckets
    from homegen.serving.engine import PageEngine
    from homegen.serving.requests import RequestError, parse_request
    from homegen.training.checkpoints import CheckpointError

    buckets = None
    if args.port is not None:
        try:
            buckets = ShapeBuckets(*(tuple(int(x) for x in text.split(",")) for text in
                                     (args.batch_sizes, args.beam_sizes, args.sample_widths)),
                                   page_shapes=page_shapes(args.page_shapes), intent_tokens=args.intent_tokens)
        except ValueError as e:
            parser.error(f"--batch_sizes/--beam_sizes/--sample_widths/--page_shapes/--intent_tokens: {e}")
        if args.explore_share > 0 and buckets.sample_widths[0] != 1:
            parser.error("--explore_share samples one page per request: --sample_widths must include 1")
    try:
        engine = PageEngine(args.checkpoint, args.step, objective=args.objective, buckets=buckets,
                            **search_overrides(args))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    if args.catalog:
        try:
            refreshed = engine.refresh_catalog(args.catalog)
        except (ValueError, OSError) as e:  # DataFormatError is a ValueError naming the file and line
            print(f"serve.py: error: {e}", file=sys.stderr)
            return 2
        print(f"catalog refresh: {refreshed['added']:,} new items ({refreshed['placeable']:,} admitted by a shelf), "
              f"{refreshed['items']:,} in all", flush=True)
    if args.requests:
        if not os.path.isfile(args.requests):
            print(f"serve.py: error: {args.requests} does not exist", file=sys.stderr)
            return 2
        impressions = None
        if args.impressions:
            from homegen.serving.impressions import RotatingLog

            counts = {"written": 0, "dropped": 0}
            impressions = RotatingLog(args.impressions, "impressions", log_settings(args),
                                      on_written=lambda n: counts.update(written=counts["written"] + n),
                                      on_dropped=lambda n, why: counts.update(dropped=counts["dropped"] + n))
        errors = run_batch(engine, args.requests, args.output, args.batch_size, impressions, exploration(args))
        if impressions is not None:
            impressions.close()
            print(f"impressions: {counts['written']:,} logged to {args.impressions}"
                  + (f", {counts['dropped']:,} DROPPED (the folder could not be written)" if counts["dropped"] else ""))
        print(f"wrote {args.output} ({len(errors)} request(s) with errors)")
        if errors:
            (line, reason), more = errors[0], len(errors) - 1
            print(f"serve.py: {len(errors)} request line(s) failed; first: line {line}: {reason}"
                  + (f" (and {more} more; see {args.output})" if more else ""), file=sys.stderr)
            return 1
        return 0
    if args.port is not None:
        return serve_http(engine, args)
    context = dict(pair.split("=", 1) for pair in args.context.split(",") if "=" in pair)
    if args.intent:
        context["intent"] = args.intent
    obj = {"user_id": args.user or "anonymous", "history": [h for h in args.history.split(",") if h],
           "context": context, "beam_size": args.beam_size, "temperature": args.temperature}
    try:
        response = engine.generate([parse_request(obj)])[0]
    except RequestError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    if "error" in response:
        print(f"serve.py: error: {response['error']}", file=sys.stderr)
        return 1
    print_page(engine, response)
    return 0


if __name__ == "__main__":
    sys.exit(main())

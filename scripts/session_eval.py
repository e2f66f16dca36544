"""In-session regeneration on the synthetic world: after the user streams and skips on a first page (drawn
from the world's response model), the page regenerated with those `session` events against the first page
shown again (paired over requests, exact expected streams under the user's new state), and the latency of a
regeneration next to a cold request.

    python scripts/session_eval.py --checkpoint RUN [--split validation] [--max_users 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder of a synthetic-world checkpoint")
    parser.add_argument("--step", type=int, default=None, help="default: the newest readable step")
    parser.add_argument("--split", default="validation", choices=["validation", "test"],
                        help="the world's last --max_users requests (validation) or its first (test)")
    parser.add_argument("--max_users", type=int, default=200)
    parser.add_argument("--beam_size", type=int, default=4)
    parser.add_argument("--latency_requests", type=int, default=20, help="requests timed one at a time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the users' sampled events")
    parser.add_argument("--out", default=None, help="folder for session.json")
    args = parser.parse_args(argv)
    if args.max_users < 2:
        parser.error("--max_users must be >= 2")

    from homegen.evaluation.pages import engine_world_folder, read_split
    from homegen.evaluation.session import regeneration_gain
    from homegen.serving.engine import PageEngine
    from homegen.training.checkpoints import CheckpointError

    try:
        engine = PageEngine(args.checkpoint, args.step)
        world = engine.world
        if world is None:
            raise ValueError(f"{args.checkpoint} was not trained on the synthetic world")
        requests = read_split(os.path.join(engine_world_folder(engine), "requests.jsonl"), args.max_users, args.split)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"session_eval.py: error: {e}", file=sys.stderr)
        return 2
    full = [{**r, "min_items_per_shelf": r["max_items_per_shelf"], "beam_size": args.beam_size} for r in requests]
    result = regeneration_gain(engine, world, full, args.seed, args.latency_requests)
    result.update(checkpoint=os.path.abspath(args.checkpoint), step=engine.step, split=args.split)
    print(f"step {engine.step}; {result['requests']} {args.split} requests, full shelves, beam {args.beam_size}; "
          f"per session {result['streams_per_session']:.2f} streams and {result['skips_per_session']:.2f} skips")
    print(f"expected streams of the first page before the events:  {result['first_page_before_events']:.3f}")
    print(f"after the events, the first page shown again:          {result['first_page_again']:.3f}")
    print(f"after the events, the page regenerated with them:      {result['regenerated_page']:.3f}")
    print(f"after the events, regenerated from the skips alone:    {result['skips_only_page']:.3f}")
    print(f"regenerated - shown again: {result['gain']:+.3f} +- {result['gain_se']:.3f}; regenerated - from the skips "
          f"alone: {result['gain_from_history']:+.3f} +- {result['gain_from_history_se']:.3f} (paired, standard "
          f"errors); skipped items shown again per regenerated page: {result['skipped_items_shown_again']:.2f}")
    for name in ("cold", "regenerate"):
        ms = result[f"latency_{name}_ms"]
        print(f"latency {name:<10} median {ms['median']:.1f} ms, p90 {ms['p90']:.1f} ms "
              f"(prompt {result['prompt_tokens'][name]:.1f} tokens; one request at a time)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "session.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

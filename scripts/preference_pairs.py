"""Preference pairs for the DPO stage, from a checkpoint's own pages ranked by a learned reward.

    python scripts/preference_pairs.py --checkpoint RUN --out PAIRS [--requests 4000] [--samples 8] \
        [--reward_model OTHER_RUN[@STEP] ...] [--pessimism 1.0] [--logs FILE.jsonl]
    python train.py --config configs/demo.py:preference --init_from RUN --workdir RUN_DPO \
        --config.preference.pairs=PAIRS [--config.data.preset=small]

For each of the first --requests page logs (default: the training logs of the checkpoint's synthetic world;
else --logs, FORMATS.md §3), the checkpoint's beam-search pages (its beam of 4) and --samples sampled pages (temperature 1)
are the candidates; the value heads of --reward_model (default: the checkpoint's own; repeat for an
ensemble, and --pessimism k ranks by mean - k x standard deviation of their predictions; RUN@STEP takes a run's
value head at one of its kept steps, so one run's checkpoints can make a snapshot ensemble) rank them, and the
best and worst make a pair. A synthetic-world checkpoint is asked for full pages (its world's shelves x
items), as evaluate.py asks; other logs keep each logged page's shape unless --num_shelves/--items_per_shelf.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from homegen.commands.search_flags import add_search_flags, search_overrides
from homegen.data.formats import DataFormatError
from homegen.evaluation.preference_pairs import logged_requests, make_pairs
from homegen.serving.engine import PageEngine
from homegen.training.checkpoints import CheckpointError


def _default_logs(engine: PageEngine, checkpoint: str) -> str:
    from homegen.evaluation.pages import engine_world_folder

    if engine.world is None:
        raise ValueError(f"{checkpoint} was not trained on the synthetic world: pass --logs FILE.jsonl")
    return os.path.join(engine_world_folder(engine), "pages.jsonl")


def _reward_engines(specs: list[str] | None, policy: PageEngine, policy_path: str,
                    policy_step: int | None) -> list[PageEngine]:
    """The engine of each `RUN` or `RUN@STEP` reward model (default: the policy alone); the policy's own engine
    where a spec names the policy's run at its step. Refuses a malformed step and a run without a value head."""
    engines = []
    for spec in specs or [policy_path]:
        path, _, step_text = spec.rpartition("@") if "@" in os.path.basename(spec) else (spec, "", "")
        if step_text and not step_text.isdigit():
            raise ValueError(f"--reward_model {spec}: the step after '@' must be a whole number")
        step = int(step_text) if step_text else None
        same_run = os.path.abspath(path) == os.path.abspath(policy_path)
        engine = policy if same_run and (step == policy.step or (step is None and policy_step is None)) \
            else PageEngine(path, step)
        if not engine.has_value_head:
            raise ValueError(f"{spec} has no value head: it cannot rank pages")
        engines.append(engine)
    return engines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder: the policy, and the DPO reference")
    parser.add_argument("--step", type=int, default=None, help="default: the best (or latest) step")
    parser.add_argument("--out", required=True, help="folder for pairs.npz and pairs.json")
    parser.add_argument("--logs", default=None, help="page logs whose users and contexts are the requests")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=8, help="sampled pages per request, beside the beam's")
    parser.add_argument("--reward_model", action="append", default=None,
                        help="run folder (RUN or RUN@STEP) whose value head ranks the pages; repeat for an ensemble")
    parser.add_argument("--pessimism", type=float, default=0.0, help="rank by mean - k x sd of the heads")
    parser.add_argument("--min_gap", type=float, default=0.0, help="least reward gap of a pair")
    parser.add_argument("--num_shelves", type=int, default=None)
    parser.add_argument("--items_per_shelf", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    add_search_flags(parser)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.samples < 1:
        parser.error("--requests and --samples must be >= 1")
    try:
        start = time.perf_counter()
        engine = PageEngine(args.checkpoint, args.step, **search_overrides(args))
        reward_engines = _reward_engines(args.reward_model, engine, args.checkpoint, args.step)
        world = engine.world
        shelves, items = args.num_shelves, args.items_per_shelf
        if world is not None and args.logs is None:
            shelves, items = shelves or world.config.num_shelves, items or world.config.max_items
        logs = args.logs or _default_logs(engine, args.checkpoint)
        requests = logged_requests(logs, args.requests, shelves, items)
        pairs, summary = make_pairs(engine, reward_engines, requests, args.samples, args.pessimism, args.min_gap,
                                    seed=args.seed, report=lambda line: print(line, file=sys.stderr, flush=True))
        pairs.save(args.out)
    except (ValueError, FileNotFoundError, DataFormatError, CheckpointError) as e:
        print(f"preference_pairs.py: {e}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Whether a synthetic-world checkpoint's pages follow the request's intent, in seen and unseen wordings
(evaluation/intent.py): expected streams under the intent, paired against the same request without one, and
how far each page moves toward the intent's mood, genre and energy, beside the oracle's.

    python scripts/intent_eval.py --checkpoint RUN [--split validation] [--requests 120] [--beam_size 4]

The requests are the world's held-out ones (the last --requests for validation, the first for test, as
`scripts/evaluate.py` splits them), request k given intent k mod 12.
"""

from __future__ import annotations

import argparse
import os
import sys

from homegen.evaluation.intent import intent_table
from homegen.evaluation.pages import engine_world_folder, read_split
from homegen.serving.engine import PageEngine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run trained on the synthetic world")
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--beam_size", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        engine = PageEngine(args.checkpoint)
        if engine.world is None:
            raise ValueError(f"{args.checkpoint} was not trained on the synthetic world: intents are judged by its "
                             "response model")
        requests = read_split(os.path.join(engine_world_folder(engine), "requests.jsonl"), args.requests, args.split)
    except (FileNotFoundError, ValueError) as e:
        print(f"intent_eval.py: error: {e}", file=sys.stderr)
        return 2
    rows = intent_table(engine, requests, args.beam_size)
    print(f"{len(requests)} {args.split} requests, beam {args.beam_size}, objective {engine.objective}; streams judged "
          "for the user with the intent")
    print(f"{'pages':<28}{'streams':>16}{'gain over no intent':>22}{'mood share':>12}{'genre share':>13}"
          f"{'energy gap':>12}")
    for r in rows:
        print(f"{r['pages']:<28}{r['expected_streams']:>9.3f} +- {r['se']:.3f}{r['gain']:>+13.3f} +- {r['gain_se']:.3f}"
              f"{r['mood_share']:>12.3f}{r['genre_share']:>13.3f}{r['energy_gap']:>12.3f}")
    seen, unseen = (next(r["gain"] for r in rows if r["pages"] == w) for w in ("intent, seen wording",
                                                                               "intent, unseen paraphrase"))
    if seen > 0:
        print(f"unseen paraphrases keep {unseen / seen:.0%} of the gain of seen wordings")
    return 0


if __name__ == "__main__":
    sys.exit(main())

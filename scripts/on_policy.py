"""Learning on-policy in the synthetic world: rounds of serve (with exploration) -> log -> retrain, each
round's model measured against the oracle on the world's validation requests.

    python scripts/on_policy.py --world WORLD --out OUT [--config configs/demo.py] [--rounds 3] [--steps 600] \
        [--days 5] [--requests_per_day 400] [--explore_share 0.2] [--explore_temperature 0.5] \
        [--eval_requests 100] [--served_repeats 1] [--validation_fraction 0.01] [--promote] [--promote_alpha 0.05] \
        [--port 8131] [-- CONFIG FLAGS ...]

Round 0 trains on the world's logged pages (WORLD/pages.jsonl, its logging policy). Round r serves the round
r-1 model with `serve.py --impressions --explore_share`, plays the world's users against it for --days
(scripts/online_world.py's driver), joins their outcomes, and trains a new model from scratch on the world's
pages plus every round's served pages so far (`data.world` keeps the world's shelf rules and evaluation), each
round's pages --served_repeats times (weighting what the policy's own traffic taught against the world's logs).
The training run's validation split is the newest --validation_fraction of the pages by time: the last round's
served pages are the newest, so a large fraction would hold them out of training (the default keeps 1%).
Each round: `scripts/evaluate.py --split validation` (expected streams of its beam pages over the oracle's),
the streams per page its users gave the served pages, and the time each stage took; the curve goes to
OUT/rounds.json.

With --promote, a new model reaches traffic only by winning an online experiment. From round 2 on, a round's
days are an A/B test: the incumbent (the last promoted model; round 0's at first) and the candidate (the model
round r-1 trained) each serve half the users, chosen by a salted hash of the user id, both with the same
exploration. `evaluation/experiment.py` then compares the arms' streams per page per user (Welch, CUPED with
the users' pages of earlier rounds as the pre-period); the candidate is promoted when it is better at
--promote_alpha. Both arms' pages are training data. The decision, with its figures, is in the round's row.

Each stage's output stays in OUT/round<r>/ (a rerun resumes from the last finished round).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from homegen.data.simulator.online import OnlineWorld
from homegen.evaluation.experiment import analyse, user_panel
from homegen.evaluation.online import play_day
from homegen.evaluation.ope import world_config_of
from homegen.serving.experiments import read_experiment
from homegen.serving.impressions import read_log_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], log: str) -> None:
    with open(log, "w") as f:
        result = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {result.returncode}); see {log}")


def train(args, workdir: str, logs: list[str], extra: list[str]) -> None:
    """Trains a round's model from scratch on the world's logs and every served log, each `served_repeats` times."""
    files = logs[:1] + [path for path in logs[1:] for _ in range(args.served_repeats)]
    run([sys.executable, "train.py", "--config", args.config, "--workdir", workdir,
         f"--config.data.page_logs={','.join(files)}", f"--config.data.world={args.world}",
         f"--config.data.validation_fraction={args.validation_fraction}",
         f"--config.train.steps={args.steps}", f"--config.train.checkpoint_every={args.steps}",
         f"--config.train.eval_every={args.steps}", *extra], workdir + ".log")


def evaluate(args, workdir: str) -> dict:
    out = workdir + "_eval"
    run([sys.executable, "scripts/evaluate.py", "--checkpoint", workdir, "--split", "validation",
         "--max_users", str(args.eval_requests), "--ranking", "beam", "--out", out], out + ".log")
    with open(os.path.join(out, "results.json")) as f:
        pages = json.load(f)["pages"]
    beam = next(name for name in pages if name.startswith("homegen beam search ("))
    return {"method": beam, "of_oracle": pages[beam]["of_oracle"], "expected_streams": pages[beam]["expected_streams"],
            "logging_policy_of_oracle": pages["logging policy"]["of_oracle"]}


def write_experiment(folder: str, round_number: int, candidate: str) -> str:
    """The round's experiment file: the server's own checkpoint (the incumbent) against `candidate`, half the
    users each; returns its path."""
    path = os.path.join(folder, "experiment.json")
    with open(path, "w") as f:
        json.dump({"name": f"round{round_number}", "salt": f"on-policy-round{round_number}",
                   "arms": [{"name": "incumbent", "share": 0.5},
                            {"name": "candidate", "share": 0.5, "checkpoint": candidate}]}, f, indent=1)
    return path


def promotion(experiment_path: str, pages: list[str], days: list[dict], alpha: float) -> dict:
    """The round's A/B test from its joined pages (`pages[-1]`; earlier rounds' pages are the users'
    pre-period for CUPED): each arm's streams per page per user, the candidate's CUPED-adjusted difference
    (Welch) and whether it is promoted (better at `alpha`)."""
    experiment = read_experiment(experiment_path)
    records = [record for path in pages for _, record in read_log_lines(path)]
    panel = user_panel(records, experiment.name, [float(day["start"]) for day in days])
    table = analyse(panel, {arm.name: arm.share for arm in experiment.arms}, "incumbent")
    test = table["arms"]["candidate"]["against_control_cuped"]
    return {"incumbent_streams_per_page": table["arms"]["incumbent"]["streams_per_page"],
            "candidate_streams_per_page": table["arms"]["candidate"]["streams_per_page"],
            "users": table["srm"]["users"], "srm_p": table["srm"]["p"], "diff_cuped": test["diff"],
            "ci_cuped": test["ci"], "p_cuped": test["p"], "promoted": bool(test["diff"] > 0 and test["p"] < alpha)}


def ab_summary(decision: dict) -> str:
    """One line's part on a round's A/B test (`promotion`'s result)."""
    outcome = "promoted" if decision["promoted"] else "kept the incumbent"
    return f"A/B {decision['diff_cuped']:+.3f} streams a page (p {decision['p_cuped']:.3g}): {outcome}; "


def serve_round(args, checkpoint: str, folder: str, world: OnlineWorld, first_day: int,
                experiment: str | None = None) -> dict:
    """Serves `checkpoint` (and, with an `experiment` file, its other arms) with impression logs and
    exploration while the world's users play --days days."""
    logs = os.path.join(folder, "impressions")
    with open(os.path.join(folder, "serve.log"), "w") as log:
        server = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", checkpoint, "--port", str(args.port),
                                   "--impressions", logs, "--explore_share", str(args.explore_share),
                                   "--explore_temperature", str(args.explore_temperature),
                                   "--batch_sizes", "1,8", "--beam_sizes", "4", "--sample_widths", "1",
                                   *(["--experiment", experiment] if experiment else [])],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            for line in server.stdout:
                log.write(line)
                if "serving checkpoint step" in line:
                    break
            else:
                raise RuntimeError(f"serve.py ended before serving; see {log.name}")
            days = [play_day(world, f"http://127.0.0.1:{args.port}", day, args.requests_per_day, 8)
                    for day in range(first_day, first_day + args.days)]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    pages = os.path.join(folder, "pages.jsonl")
    run([sys.executable, "-m", "homegen.cli", "join", "--impressions", logs, "--output", pages],
        os.path.join(folder, "join.log"))
    served = sum(d["pages"] for d in days)
    streams = sum(d["streams"] for d in days)
    return {"pages": pages, "served": served, "served_streams_per_page": streams / max(served, 1), "days": days}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a scripts/simulate.py folder (world.json, pages.jsonl)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600, help="training steps of every round's model")
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--requests_per_day", type=int, default=400)
    parser.add_argument("--explore_share", type=float, default=0.2)
    parser.add_argument("--explore_temperature", type=float, default=0.5)
    parser.add_argument("--eval_requests", type=int, default=100)
    parser.add_argument("--served_repeats", type=int, default=1,
                        help="how many times each round's served pages appear in the training logs")
    parser.add_argument("--validation_fraction", type=float, default=0.01,
                        help="the newest share of the pages held out as each run's validation split")
    parser.add_argument("--promote", action="store_true",
                        help="from round 2, serve the last promoted model against the newest in an A/B test and "
                             "promote the newest only when it wins")
    parser.add_argument("--promote_alpha", type=float, default=0.05, help="the A/B test's level for promotion")
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("extra", nargs="*", help="config flags for every round's training (after --)")
    args = parser.parse_args(argv)
    args.world, args.out = os.path.abspath(args.world), os.path.abspath(args.out)
    if args.served_repeats < 1 or not 0 < args.validation_fraction < 0.5:
        parser.error(f"--served_repeats must be >= 1 and --validation_fraction in (0, 0.5), got "
                     f"{args.served_repeats} and {args.validation_fraction}")
    if not 0 < args.promote_alpha < 1:
        parser.error(f"--promote_alpha must be in (0, 1), got {args.promote_alpha}")
    try:
        world = OnlineWorld(world_config_of(args.world), seed=0)
    except (FileNotFoundError, TypeError) as e:
        print(f"on_policy.py: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    curve_path = os.path.join(args.out, "rounds.json")
    curve = json.load(open(curve_path)) if os.path.exists(curve_path) else []
    logs = [os.path.join(args.world, "pages.jsonl")] + [r["pages"] for r in curve[1:]]
    first_day = world.world.config.now_day + 1 + args.days * max(len(curve) - 1, 0)
    for r in range(len(curve), args.rounds + 1):
        folder = os.path.join(args.out, f"round{r}")
        os.makedirs(folder, exist_ok=True)
        row: dict = {"round": r}
        start = time.time()
        newest = os.path.join(args.out, f"round{r - 1}", "run")
        incumbent = curve[-1].get("promoted", newest) if args.promote and r >= 2 else newest
        if r:
            experiment = write_experiment(folder, r, newest) if incumbent != newest else None
            row.update(serve_round(args, incumbent, folder, world, first_day, experiment))
            logs.append(row["pages"])
            first_day += args.days
            if experiment:
                row["experiment"] = promotion(experiment, logs[1:], row["days"], args.promote_alpha)
                incumbent = newest if row["experiment"]["promoted"] else incumbent
        row["promoted"] = incumbent if r else os.path.join(folder, "run")
        row["serve_s"] = round(time.time() - start)
        start = time.time()
        train(args, os.path.join(folder, "run"), logs, args.extra)
        row["train_s"] = round(time.time() - start)
        start = time.time()
        row.update(evaluate(args, os.path.join(folder, "run")))
        row["eval_s"] = round(time.time() - start)
        row["logged_pages"] = sum(sum(1 for _ in open(p)) for p in logs)
        curve.append(row)
        with open(curve_path, "w") as f:
            json.dump(curve, f, indent=1)
        print(f"round {r}: {row['of_oracle']:.3f} of the oracle on validation ({row['method']}); "
              + (f"served {row['served']} pages at {row['served_streams_per_page']:.2f} streams; " if r else "")
              + (ab_summary(row["experiment"]) if "experiment" in row else "")
              + f"{row['logged_pages']} pages trained on; serve {row['serve_s']} s, train {row['train_s']} s, "
                f"eval {row['eval_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

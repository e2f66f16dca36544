"""Analyses an online experiment from its joined page logs: per-arm streams per page with confidence
intervals, a sample-ratio-mismatch check, CUPED with pre-experiment engagement and an always-valid sequential
test with daily looks (evaluation/experiment.py says which and how); optionally the false-positive rate of
A/A splits of the same users and the power of the observed effect at a given size.

    homegen join --impressions LOGS --output pages.jsonl
    python scripts/experiment.py --logs pages.jsonl --experiment arms.json [--control NAME] \
        [--days days.json | --look_s 86400] [--aa 200] [--power 200 --power_users 100] [--out results.json]

arms.json is the file the server ran (its name and shares); --days is scripts/online_world.py's days.json.
Exit status 0; 2 for a missing or malformed file (named with its line) or logs that do not match the file.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from homegen.data.formats import DataFormatError
from homegen.evaluation.experiment import aa_rates, analyse, power, user_panel
from homegen.serving.experiments import read_experiment
from homegen.serving.impressions import read_log_lines


def look_starts(records: list[dict], experiment: str, days: str | None, look_s: float) -> list[float]:
    if days:
        with open(days) as f:
            return [float(day["start"]) for day in json.load(f)]
    stamps = [float(r["timestamp"]) for r in records if r.get("experiment") == experiment]
    begin, end = min(stamps), max(stamps)
    return list(np.arange(begin, end + 1e-9, look_s)) or [begin]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", required=True, help="joined page logs (homegen join)")
    parser.add_argument("--experiment", required=True, help="the experiment file the server ran")
    parser.add_argument("--control", default=None, help="the control arm (default: the file's first)")
    parser.add_argument("--days", default=None, help="days.json of scripts/online_world.py: one look per day")
    parser.add_argument("--look_s", type=float, default=86400.0, help="without --days: a look every this many seconds")
    parser.add_argument("--aa", type=int, default=0, help="A/A splits of the same users to estimate false positives")
    parser.add_argument("--power", type=int, default=0, help="bootstrap experiments to estimate power")
    parser.add_argument("--power_users", type=int, default=100, help="users per arm in each power experiment")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        experiment = read_experiment(args.experiment)
        records = [record for _, record in read_log_lines(args.logs)]
        control = args.control or experiment.arms[0].name
        shares = {arm.name: arm.share for arm in experiment.arms}
        panel = user_panel(records, experiment.name, look_starts(records, experiment.name, args.days, args.look_s))
        table = analyse(panel, shares, control)
    except (OSError, ValueError, DataFormatError) as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        return 2
    srm = table["srm"]
    print(f"experiment {experiment.name!r}: {table['users']:,} users, {table['pages']:,} pages, {table['looks']} looks; "
          f"sample ratio {srm['users']} against {srm['expected']}: p = {srm['p']:.3g}"
          + ("  ** SAMPLE RATIO MISMATCH: do not read the rest **" if srm["p"] is not None and srm["p"] < 0.001 else ""))
    print(f"CUPED: theta {table['cuped_theta']:.3f}, variance reduction {table.get('cuped_variance_reduction', 0):.1%}; "
          f"sequential test tau {table['tau']:.4f}")
    print("| arm | users | pages | streams per page (95% CI) | against control (Welch) | p | with CUPED | p | always-valid p |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm, row in table["arms"].items():
        mean = (f"{row['streams_per_page']:.3f} ({row['ci'][0]:.3f}, {row['ci'][1]:.3f})"
                if "streams_per_page" in row else "-")
        cells = ["-"] * 5
        if "against_control" in row:
            plain, adjusted = row["against_control"], row["against_control_cuped"]
            cells = [f"{plain['diff']:+.3f} ({plain['ci'][0]:+.3f}, {plain['ci'][1]:+.3f})", f"{plain['p']:.3g}",
                     f"{adjusted['diff']:+.3f} ({adjusted['ci'][0]:+.3f}, {adjusted['ci'][1]:+.3f})",
                     f"{adjusted['p']:.3g}", f"{min(row['sequential']['always_valid_p']):.3g}"]
        print(f"| {arm}{' (control)' if arm == control else ''} | {row['users']} | {row['pages']} | {mean} | "
              + " | ".join(cells) + " |")
    results = {"experiment": experiment.name, "control": control, **table}
    if args.aa:
        results["aa"] = aa_rates(panel, args.aa, tau=table["tau"])
        print(f"A/A over {args.aa} re-randomised splits of these users: false-positive rate at 5% "
              f"{results['aa']['false_positive_rate']}; CUPED variance reduction {results['aa']['cuped_variance_reduction']:.1%}")
    if args.power:
        treated = next(a for a in shares if a != control)
        results["power"] = power(panel, control, treated, args.power_users, args.power, tau=table["tau"])
        print(f"power of {treated} against {control} with {args.power_users} users per arm "
              f"({args.power} bootstrap experiments): {results['power']['power']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/experiment.py's statistics (evaluation/experiment.py) on panels with known truth, and the online
loop end to end: a server running an experiment file, the synthetic world's users played against it over
HTTP day by day (scripts/online_world.py), their outcomes joined into page logs and analysed."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, running_server

from homegen.evaluation.experiment import UserPanel, aa_rates, analyse, cuped, power, user_panel


def panel(n=400, effect=0.0, looks=4, pre_corr=0.0, seed=0, share=0.5):
    """Users with a per-user level; arm b adds `effect` streams per page; pages spread over `looks`."""
    rng = np.random.default_rng(seed)
    level = rng.gamma(4.0, 0.4, n)
    arms = np.where(rng.random(n) < share, "a", "b").astype(object)
    pages = np.cumsum(rng.poisson(2.0, (n, looks)) + 1, axis=1).astype(float)
    per_page = level + effect * (arms == "b") + rng.normal(0, 0.3, n)
    streams = pages * per_page[:, None] + rng.normal(0, 0.5, (n, looks))
    pre = np.where(rng.random(n) < 0.9, pre_corr * level + (1 - pre_corr) * rng.gamma(4.0, 0.4, n), np.nan)
    return UserPanel([f"u{k}" for k in range(n)], arms, streams, pages, pre)


def test_aa_false_positive_rate_holds_and_sequential_peeking_stays_valid():
    rates = aa_rates(panel(n=600, seed=1), experiments=200)["false_positive_rate"]
    assert 0.02 <= rates["welch"] <= 0.09 and 0.02 <= rates["cuped"] <= 0.09  # 200 draws of a 5% rate: sd 1.5%
    assert rates["sequential (daily looks)"] <= 0.07


def test_a_real_effect_is_found_and_cuped_shrinks_the_variance_it_is_found_with():
    truth = panel(n=600, effect=0.4, pre_corr=0.95, seed=2)
    table = analyse(truth, {"a": 0.5, "b": 0.5}, "a")
    row = table["arms"]["b"]
    assert row["against_control"]["ci"][0] < 0.4 < row["against_control"]["ci"][1]
    assert row["against_control_cuped"]["se"] < 0.8 * row["against_control"]["se"]
    assert table["cuped_variance_reduction"] > 0.3
    assert power(truth, "a", "b", 300, 50)["power"]["cuped"] > power(truth, "a", "b", 300, 50)["power"]["welch"] - 0.05
    trail = row["sequential"]["always_valid_p"]
    assert all(later <= earlier for earlier, later in zip(trail, trail[1:])) and trail[-1] < 0.05


def test_sample_ratio_mismatch_is_flagged():
    skewed = panel(n=2000, share=0.6, seed=3)
    assert analyse(skewed, {"a": 0.5, "b": 0.5}, "a")["srm"]["p"] < 1e-6
    assert analyse(panel(n=2000, seed=3), {"a": 0.5, "b": 0.5}, "a")["srm"]["p"] > 0.001


def test_cuped_leaves_users_without_pre_period_alone():
    values, pre = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    adjusted, theta = cuped(values, pre)
    assert theta == pytest.approx(1.0) and adjusted[2] == 3.0 and np.allclose(adjusted[[0, 1, 3, 4]], 3.0)


def test_logs_of_a_user_in_two_arms_are_refused():
    records = [{"request_id": f"r{k}", "user_id": "u1", "timestamp": k, "experiment": "e", "arm": arm,
                "page": [{"shelf": "s", "items": ["t1"], "streams": [1]}]} for k, arm in enumerate(["a", "b"])]
    with pytest.raises(ValueError, match="not sticky"):
        user_panel(records, "e", [0.0])


def test_online_experiment_end_to_end(tiny_checkpoint, tmp_path):
    from homegen.evaluation.pages import engine_world_folder
    from homegen.serving.app import ServerSettings
    from homegen.serving.engine import PageEngine

    engine = PageEngine(tiny_checkpoint)
    world = engine_world_folder(engine)
    arms = tmp_path / "arms.json"
    arms.write_text(json.dumps({"name": "pre", "salt": "p", "arms": [{"name": "all", "share": 1.0}]}))
    logs = str(tmp_path / "logs")
    settings = ServerSettings(impressions_dir=logs, experiment_file=str(arms), experiment_check_s=0.05)

    def drive(*args):
        return subprocess.run([sys.executable, "scripts/online_world.py", "--url", url, "--world", world,
                               "--requests_per_day", "60", "--concurrency", "4", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)

    with running_server(engine, settings) as (url, _):
        assert drive("--days", "1").returncode == 0
        ab = {"name": "ab", "salt": "x", "arms": [{"name": "control", "share": 0.5},
                                                    {"name": "sampled", "share": 0.5, "request": {"temperature": 1.0}}]}
        arms.write_text(json.dumps(ab))
        import time
        time.sleep(0.5)
        result = drive("--days", "2", "--first_day", "5000", "--out", str(tmp_path / "days"))
        assert result.returncode == 0, result.stderr
        assert "'control'" in result.stdout and "'sampled'" in result.stdout
    pages = str(tmp_path / "pages.jsonl")
    assert subprocess.run([sys.executable, "-m", "homegen.cli", "join", "--impressions", logs, "--output", pages],
                          cwd=ROOT, capture_output=True, text=True).returncode == 0
    out = subprocess.run([sys.executable, "scripts/experiment.py", "--logs", pages, "--experiment", str(arms),
                          "--days", str(tmp_path / "days" / "days.json"), "--aa", "20", "--out", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    results = json.load(open(tmp_path / "r.json"))
    assert results["experiment"] == "ab" and results["looks"] == 2 and results["pages"] == 120
    assert set(results["arms"]) == {"control", "sampled"}
    assert sum(row["users"] for row in results["arms"].values()) == results["users"]
    assert "| sampled |" in out.stdout and len(results["aa"]["false_positive_rate"]) == 3
    bad = subprocess.run([sys.executable, "scripts/experiment.py", "--logs", pages, "--experiment", str(arms),
                          "--control", "nobody"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "control arm 'nobody'" in bad.stderr

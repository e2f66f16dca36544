"""Online experiments (serving/experiments.py): arms from a file, sticky salted-hash assignment in the
configured shares, arms named in responses, impression logs and /metrics, a checkpoint arm served by its own
engine, hot reload of the file, and bad files refused (at start-up, and on reload with the old one kept)."""

import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import ROOT, running_server
from test_impressions import logged, post

from homegen.serving.experiments import read_experiment
from homegen.serving.requests import parse_request


def write(path, arms, salt="s1", name="exp"):
    path.write_text(json.dumps({"name": name, "salt": salt, "arms": arms}))
    return str(path)


def test_assignment_is_sticky_and_follows_the_shares(tmp_path):
    experiment = read_experiment(write(tmp_path / "e.json", [{"name": "a", "share": 0.2}, {"name": "b", "share": 0.8},
                                                              {"name": "off", "share": 0.0}]))
    arms = [experiment.assign(parse_request({"user_id": f"u{k}"})).name for k in range(5000)]
    assert 0.18 < arms.count("a") / 5000 < 0.22 and "off" not in arms  # binomial sd 0.0057
    assert all(experiment.assign(parse_request({"user_id": f"u{k}", "request_id": "x"})).name == arms[k]
               for k in range(200))  # the user decides, not the request
    other_salt = read_experiment(write(tmp_path / "f.json", [{"name": "a", "share": 0.2}, {"name": "b", "share": 0.8}],
                                       salt="s2"))
    moved = sum(other_salt.assign(parse_request({"user_id": f"u{k}"})).name != arms[k] for k in range(5000))
    assert 1200 < moved < 2000  # a new salt re-randomises: 2 x 0.2 x 0.8 = 32% expected to move


@pytest.mark.parametrize("arms,message", [
    ([{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}], "shares sum to 0.9, not 1"),
    ([{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}], "arm names must differ"),
    ([{"name": "a", "share": 1.0, "request": {"user_id": "x"}}], "'request' may set only"),
    ([{"name": "a", "share": 1.0, "request": {"beam_size": 0}}], "beam_size"),
    ([{"name": "a", "share": 1.0, "checkpoint": "/nonexistent"}], "is not a run folder"),
    ([{"name": "a", "share": 1.5}], "'share' must be a number in [0, 1]"),
])
def test_bad_experiment_files_are_refused_naming_the_file(tmp_path, arms, message):
    path = write(tmp_path / "e.json", arms)
    with pytest.raises(ValueError, match=r".*e\.json: .*" + message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        read_experiment(path)


def test_serve_refuses_a_bad_experiment_before_serving(tiny_checkpoint, tmp_path):
    path = write(tmp_path / "e.json", [{"name": "a", "share": 0.5}])
    result = subprocess.run([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint, "--port", "0",
                             "--experiment", path], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "shares sum to 0.5, not 1" in result.stderr.splitlines()[-1]


def test_arms_serve_name_and_log_their_requests_and_the_file_reloads(tiny_checkpoint, tmp_path):
    from homegen.serving.app import ServerSettings
    from homegen.serving.engine import PageEngine

    engine = PageEngine(tiny_checkpoint)
    loaded = []

    def arm_engine(path):
        loaded.append(path)
        return PageEngine(path)

    path = write(tmp_path / "e.json", [{"name": "control", "share": 0.5},
                                       {"name": "beam1", "share": 0.3, "request": {"beam_size": 1}},
                                       {"name": "twin", "share": 0.2, "checkpoint": tiny_checkpoint}])
    folder = str(tmp_path / "logs")
    settings = ServerSettings(impressions_dir=folder, experiment_file=path, experiment_check_s=0.1)
    body = {"num_shelves": 2, "min_items_per_shelf": 3, "max_items_per_shelf": 3}
    with running_server(engine, settings, arm_engine=arm_engine) as (url, _):
        assert len(loaded) == 1  # the checkpoint arm's engine, loaded before serving
        first = {k: post(url, "/v1/pages", {**body, "user_id": f"u{k}"})[1] for k in range(30)}
        again = {k: post(url, "/v1/pages", {**body, "user_id": f"u{k}"})[1] for k in range(30)}
        assert all(first[k]["arm"] == again[k]["arm"] for k in range(30))  # sticky
        assert {r["arm"] for r in first.values()} == {"control", "beam1", "twin"}
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        counts = {arm: sum(r["arm"] == arm for r in first.values()) * 2 for arm in ("control", "beam1", "twin")}
        for arm, count in counts.items():
            assert f'homegen_arm_pages_total{{arm="{arm}",experiment="exp"}} {count}.0' in metrics
        write(tmp_path / "e.json", [{"name": "control", "share": 0.5}, {"name": "beam1", "share": 0.6}])  # bad
        time.sleep(1.0)
        health = json.loads(urllib.request.urlopen(url + "/healthz").read())
        assert "shares sum to 1.1, not 1" in health["experiment"]["last_error"]
        assert post(url, "/v1/pages", {**body, "user_id": "u0"})[1]["arm"] == first[0]["arm"]  # old one stays
        write(tmp_path / "e.json", [{"name": "all-beam1", "share": 1.0, "request": {"beam_size": 1}}], name="exp2")
        deadline = time.time() + 30
        while json.loads(urllib.request.urlopen(url + "/healthz").read())["experiment"]["name"] != "exp2":
            assert time.time() < deadline
            time.sleep(0.1)
        assert all(post(url, "/v1/pages", {**body, "user_id": f"u{k}"})[1]["arm"] == "all-beam1" for k in range(5))
    records = logged(folder)
    assert len(records) == 66 and [r["arm"] for r in records[:30]] == [first[k]["arm"] for k in range(30)]
    assert {r["decoding"]["beam_size"] for r in records if r["arm"] in ("beam1", "all-beam1")} == {1}


def test_on_policy_rounds_weight_served_pages_and_hold_out_few(monkeypatch, tmp_path):
    """A round trains on the world's logs once and every served log --served_repeats times, with a small time
    holdout (the newest pages are the last round's served ones); bad settings are refused."""
    import scripts.on_policy as on_policy

    commands = []
    monkeypatch.setattr(on_policy, "run", lambda cmd, log: commands.append(cmd))
    args = on_policy.argparse.Namespace(config="configs/demo.py", world="/w", steps=10, served_repeats=3,
                                        validation_fraction=0.01)
    on_policy.train(args, str(tmp_path / "run"), ["/w/pages.jsonl", "/r1/pages.jsonl", "/r2/pages.jsonl"], [])
    flags = dict(a.split("=", 1) for a in commands[0] if a.startswith("--config.data."))
    logs = flags["--config.data.page_logs"].split(",")
    assert logs.count("/w/pages.jsonl") == 1 and logs.count("/r1/pages.jsonl") == 3 and logs.count("/r2/pages.jsonl") == 3
    assert flags["--config.data.validation_fraction"] == "0.01"
    for bad in (["--served_repeats", "0"], ["--validation_fraction", "0.6"], ["--promote_alpha", "1.5"]):
        with pytest.raises(SystemExit):
            on_policy.main(["--world", str(tmp_path), "--out", str(tmp_path / "out"), *bad])


def test_on_policy_promotes_a_candidate_only_when_it_wins_its_ab_test(tmp_path):
    """--promote: the round's experiment file pits the server's checkpoint against the newest model, half the
    users each; the joined pages decide (CUPED over the users' earlier-round pages), in both directions."""
    import scripts.on_policy as on_policy

    candidate = tmp_path / "round1" / "run"
    candidate.mkdir(parents=True)
    path = on_policy.write_experiment(str(tmp_path), 2, str(candidate))
    experiment = read_experiment(path)
    assert [(a.name, a.share, a.checkpoint) for a in experiment.arms] == [
        ("incumbent", 0.5, None), ("candidate", 0.5, str(candidate))]
    rng = np.random.default_rng(0)
    users = [f"u{k}" for k in range(300)]
    taste = {u: rng.uniform(0.5, 2.0) for u in users}  # what CUPED's pre-period predicts

    def page(mean: float) -> list[dict]:
        return [{"shelf": "s", "items": ["a", "b", "c"], "streams": list(rng.poisson(mean / 3, 3).astype(float))}]

    earlier = tmp_path / "round1.jsonl"
    earlier.write_text("".join(json.dumps({"request_id": f"pre-{k}", "user_id": u, "timestamp": 100.0 + k,
                                           "page": page(taste[u])}) + "\n"
                               for k, u in enumerate(users)))
    for lift, promoted in ((1.5, True), (0.7, False)):
        records = []
        for day in range(3):
            for u in users:
                arm = experiment.assign(parse_request({"user_id": u})).name
                mean = taste[u] * (lift if arm == "candidate" else 1.0)
                records.append({"request_id": f"{day}-{u}", "user_id": u, "timestamp": 1000.0 + 100 * day,
                                "experiment": "round2", "arm": arm, "page": page(mean)})
        served = tmp_path / f"round2_{lift}.jsonl"
        served.write_text("".join(json.dumps(r) + "\n" for r in records))
        days = [{"start": 1000.0 + 100 * d} for d in range(3)]
        decision = on_policy.promotion(path, [str(earlier), str(served)], days, 0.05)
        assert decision["promoted"] is promoted, decision
        assert (decision["diff_cuped"] > 0) is promoted and decision["p_cuped"] < 0.05
        assert sum(decision["users"].values()) == 300

"""The command-line contract of FORMATS.md §5, run as written (plus overrides that make the model tiny and
training short): simulate -> train on the page logs it wrote -> serve its held-out requests -> evaluate, and
train on an interaction file. Each command must use the data it is given."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from homegen.data.vocab import Vocabulary
from homegen.serving.engine import PageEngine
from homegen.serving.requests import parse_request
from homegen.serving.validity import PageValidator
from homegen.training.checkpoints import Checkpoints

TINY = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.train.steps=4", "--config.train.batch_size=8", "--config.train.eval_every=4",
        "--config.train.checkpoint_every=4", "--config.train.eval_batches=1", "--config.train.warmup_steps=1"]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def meta_of(workdir: str) -> dict:
    return Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True).read_meta()[1]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sim"))
    result = cli("scripts/simulate.py", "--out", out, "--items", "300", "--users", "60", "--pages", "800",
                 "--seed", "5", "--requests", "12", "--eval-requests", "0")
    assert result.returncode == 0, result.stderr
    return out


def test_page_logs_train_serve_evaluate(simulated, tmp_path):
    run = str(tmp_path / "run")
    pages, catalog = os.path.join(simulated, "pages.jsonl"), os.path.join(simulated, "catalog.jsonl")
    result = cli("train.py", "--config", "configs/pages_small.py", "--workdir", run,
                 f"--config.data.page_logs={pages}", f"--config.data.catalog={catalog}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    # It trained on the given logs (not the built-in world): eligibility from their shelf/item pairs, the
    # catalog's items in the vocabulary, and no synthetic world built.
    meta = meta_of(run)
    assert meta["config"]["data"]["source"] == "page_logs" and meta["eligibility"]["kind"] == "observed"
    with open(catalog) as f:
        catalog_items = {json.loads(line)["item_id"] for line in f}
    assert set(Vocabulary.from_json(meta["vocab"]).items.item_ids) == catalog_items
    assert not [d for d in os.listdir(os.path.join(run, "tfds")) if "synthetic" in d]

    responses = str(tmp_path / "out.jsonl")
    requests = os.path.join(simulated, "requests.jsonl")
    served = cli("serve.py", "--checkpoint", run, "--requests", requests, "--output", responses)
    assert served.returncode == 0, served.stderr[-3000:]
    with open(requests) as f:
        asked = [parse_request(json.loads(line)) for line in f]
    with open(responses) as f:
        answered = [json.loads(line) for line in f]
    engine = PageEngine(run)
    validator = PageValidator(engine.vocab, engine.eligibility_spec)
    assert len(answered) == len(asked) == 12
    for request, response in zip(asked, answered):
        assert validator.violations(request, response["page"]) == [], response

    evaluated = cli("scripts/evaluate.py", "--checkpoint", run)
    assert evaluated.returncode == 2
    assert evaluated.stderr.strip().splitlines()[-1].startswith(f"evaluate.py: error: {run} was trained on page logs")


def test_interactions_train(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("".join(f"u{u} " + " ".join(f"i{(u + k) % 40}" for k in range(8)) + "\n" for u in range(80)))
    run = str(tmp_path / "run")
    result = cli("train.py", "--config", "configs/amazon_toys.py", "--workdir", run,
                 f"--config.data.interactions={path}", "--config.data.item_attributes=False", *TINY,
                 "--config.eval.max_users=20")
    assert result.returncode == 0, result.stderr[-3000:]
    meta = meta_of(run)
    assert meta["kind"] == "sequences" and meta["config"]["data"]["source"] == "interactions"
    assert len(Vocabulary.from_json(meta["vocab"]).items.item_ids) == 40


def test_contradictory_data_flags_are_one_line_errors(tmp_path):
    result = cli("train.py", "--config", "configs/amazon_toys.py", "--workdir", str(tmp_path),
                 "--config.data.page_logs=pages.jsonl")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "train.py: error: both data.page_logs and data.interactions are set: give one data source")

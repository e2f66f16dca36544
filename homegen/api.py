"""homegen from Python: load a checkpoint, generate Home pages for requests, score given pages, train or
fine-tune with a config.

    import homegen

    model = homegen.load("runs/demo")
    [response] = model.generate([{"user_id": "u7", "history": ["t1", "t5"], "context": {"hour": 8}}])
    [scored] = model.score([{"user_id": "u7"}], [response["page"]])

    cfg = homegen.config("runs/demo")        # a run's own config, or a name: "demo", "pages_small:semantic"
    cfg.finetune.lora_rank = 8
    homegen.train(cfg, "runs/demo_lora", init_from="runs/demo")

Requests and responses are the dictionaries of FORMATS.md §4.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

import ml_collections

from homegen.configs.base import base_config
from homegen.serving.engine import PageEngine
from homegen.serving.requests import PageRequest, parse_request
from homegen.training.checkpoints import Checkpoints, checkpoint_dir
from homegen.training.loop import RunResult, run


class PageModel:
    """One checkpoint, ready to generate and score pages (what serve.py runs, without a server)."""

    def __init__(self, engine: PageEngine):
        self.engine = engine

    @property
    def step(self) -> int:
        """The checkpoint step that was loaded."""
        return self.engine.step

    @property
    def shelves(self) -> list[str]:
        """The shelf types the model knows."""
        return list(self.engine.shelf_types)

    @property
    def items(self) -> list[str]:
        """The item ids the model knows."""
        return list(self.engine.item_ids)

    def generate(self, requests: Sequence[dict], objective: str | None = None) -> list[dict]:
        """One response per request (FORMATS.md §4): the best page, its log-probability and, with a value
        head and the `streams` objective, its predicted streams; `pages` too when a request asks for
        `num_pages` > 1. A request whose constraints no page can meet gets {"error": reason}; a malformed
        request raises `RequestError`. `objective` overrides the checkpoint's beam-search objective."""
        return self.engine.generate(_parsed(requests), objective=objective)

    def score(self, requests: Sequence[dict], pages: Sequence[list[dict]]) -> list[dict]:
        """Teacher-forced scores of given pages ([{"shelf", "items"}, ...]), one per request: each item's
        log-probability, the page's log-probability and, with a value head, each item's predicted stream
        probability and the page's predicted streams (see `PageEngine.score`)."""
        return self.engine.score(_parsed(requests), [list(page) for page in pages])


def _parsed(requests: Sequence[dict]) -> list[PageRequest]:
    if isinstance(requests, dict):
        raise TypeError("pass a list of requests, e.g. [request]")
    return [parse_request(r) for r in requests]


def load(checkpoint: str, step: int | None = None, objective: str = "auto") -> PageModel:
    """The pages model of a run folder (or its checkpoints/ folder), at `step` or the newest readable step.
    `objective`: what beam search maximises, `likelihood`, `streams` (needs a value head) or `auto`."""
    return PageModel(PageEngine(checkpoint, step, objective=objective))


def config(name_or_run: str) -> ml_collections.ConfigDict:
    """A training config: configs/<name>.py's (`"demo"`, `"pages_small:semantic"`), or the config a run folder
    was trained with (from its newest readable checkpoint; settings added to homegen since keep their
    defaults). Change its fields, then pass it to `train`."""
    if os.path.sep in name_or_run or os.path.isdir(name_or_run):
        _, meta = Checkpoints(checkpoint_dir(name_or_run), read_only=True).read_meta()
        cfg = base_config()
        for section, values in meta["config"].items():
            if isinstance(values, dict) and section in cfg:
                cfg[section].update({k: v for k, v in values.items() if k in cfg[section]})
            elif section in cfg:
                cfg[section] = values
        return cfg
    name, _, variant = name_or_run.partition(":")
    try:
        module = importlib.import_module(f"homegen.configs.{name}")
    except ModuleNotFoundError:
        module = None
    if not hasattr(module, "get_config"):
        raise ValueError(f"no config {name!r} (configs/{name}.py) and no run folder {name_or_run!r}")
    return module.get_config(variant) if variant else module.get_config()


def train(cfg: ml_collections.ConfigDict, workdir: str, init_from: str | None = None,
          resume_step: int | None = None) -> RunResult:
    """Trains as `train.py --config ... --workdir WORKDIR [--init_from RUN]` does (resuming WORKDIR's newest
    readable checkpoint when it has one) and returns the last step, its metrics and the training losses.
    Raises `TrainingError` with a one-line reason on bad input, `TrainingStopped` after Ctrl-C (the
    checkpoint at that step is saved; the same call resumes)."""
    return run(cfg, workdir, init_from=init_from, resume_step=resume_step)

"""What exploring costs: expected streams per page of an exploring sampler (at each temperature) against the
serving beam search, on the same requests of a synthetic-world checkpoint, and what a share of traffic
explored at that temperature costs the whole service (share x the paired difference)."""

from __future__ import annotations

import os

import numpy as np

from homegen.evaluation.pages import WorldJudge, engine_world_folder, read_split, standard_error
from homegen.serving.engine import PageEngine
from homegen.serving.requests import parse_request


def exploration_cost(checkpoint: str, temperatures: list[float], num_requests: int, split: str = "validation",
                     step: int | None = None, beam_size: int = 4, seeds: int = 2) -> dict:
    """{"requests", "beam": {"streams", "se"}, "temperatures": {T: {"streams", "diff", "diff_se", "entropy"}}}:
    exact expected streams per page (full shelves, the world's true response model) of beam search and of one
    sampled page per request at each temperature (averaged over `seeds` draws), their paired difference, and the
    sampled pages' mean log-propensity (how spread out the logged pages are: nearer 0 is closer to the beam)."""
    engine = PageEngine(checkpoint, step)
    world = engine.world
    if world is None:
        raise ValueError(f"{checkpoint} was not trained on the synthetic world: exploring costs are measured there")
    issued = read_split(os.path.join(engine_world_folder(engine), "requests.jsonl"), num_requests, split)
    requests = [{**r, "min_items_per_shelf": r.get("max_items_per_shelf", world.config.max_items)} for r in issued]
    judge = WorldJudge(world, requests)

    def streams(pages: list[list[dict]]) -> np.ndarray:
        return judge.slot_probabilities(pages).sum(axis=(1, 2))

    beam = streams([b["page"] for b in engine.generate([parse_request({**r, "beam_size": beam_size})
                                                        for r in requests])])
    table = {"requests": len(requests), "split": split, "objective": engine.objective,
             "beam": {"streams": float(beam.mean()), "se": standard_error(beam)}, "temperatures": {}}
    for temperature in temperatures:
        values, log_props = [], []
        for seed in range(seeds):
            sampled = engine.generate([parse_request({**r, "temperature": temperature, "seed": 1000 * seed + k})
                                       for k, r in enumerate(requests)])
            values.append(streams([s["page"] for s in sampled]))
            log_props.append([s["log_propensity"] for s in sampled])
        value = np.mean(values, axis=0)
        table["temperatures"][temperature] = {
            "streams": float(value.mean()), "diff": float((value - beam).mean()),
            "diff_se": standard_error(value - beam), "log_propensity": float(np.mean(log_props))}
    return table

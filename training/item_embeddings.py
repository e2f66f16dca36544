"""Item embeddings of a trained run: the rows of its output embedding table that score its items, for
semantic IDs that quantise what a trained atomic model learned (`data.semantic_from`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from homegen.data.vocab import Vocabulary
from homegen.model.transformer import TransformerConfig, abstract_model
from homegen.training.checkpoints import Checkpoints, checkpoint_dir


def trained_item_embeddings(run: str, item_ids: Sequence[str]) -> tuple[np.ndarray, str]:
    """((items, d_model) embeddings, row k for `item_ids[k]`; a line saying where they come from) from the
    atomic run `run` (its folder or its checkpoints folder) at its selected step (best validation metric).
    Every item must have a token in that run's vocabulary."""
    ckpt_dir = checkpoint_dir(run)
    vocab = Vocabulary.load(os.path.join(os.path.dirname(os.path.normpath(ckpt_dir)), "vocab"))
    if vocab.items.tokens_per_item != 1:
        raise ValueError(f"data.semantic_from: {run} has {vocab.items.tokens_per_item} tokens per item; "
                         "item embeddings come from a run with atomic item tokens")
    tokens, missing = [], []
    for item in item_ids:
        token = vocab.item_tokens(item)
        tokens.append(token[0] if token else 0)
        if not token:
            missing.append(item)
    if missing:
        raise ValueError(f"data.semantic_from: {len(missing)} of {len(item_ids)} items have no token in {run} "
                         f"(e.g. {missing[:3]}); it must be trained on the same items")
    checkpoints = Checkpoints(ckpt_dir, read_only=True)
    step, selected = checkpoints.selected_step()
    step, meta = checkpoints.read_meta(step)
    _, params = checkpoints.restore_model_params(step)
    graphdef, _, _ = abstract_model(TransformerConfig(**meta["model"]))
    rows = nnx.merge(graphdef, params).output_rows(jnp.asarray(tokens))  # with its attributes, if it has any
    return np.asarray(rows), f"{ckpt_dir} step {step} ({selected})"

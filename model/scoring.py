"""Teacher-forced scoring of given token sequences: each token's log-probability under the model and, for
a model with a value head, the predicted stream probability of each token where it stands; and the scores of
every next token after a prompt."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from homegen.model.decoding import prefill_hidden
from homegen.model.loss import token_log_probs


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_tokens(graphdef: nnx.GraphDef, params, tokens: jax.Array, lengths: jax.Array
                 ) -> tuple[jax.Array, jax.Array | None]:
    """For right-padded sequences (B, T) of `lengths` real tokens: (B, T - 1) log-probability of token t + 1
    given tokens 0..t, and the value head's stream probability of token t + 1 placed there (None without a
    value head). Entries past a sequence's end are meaningless."""
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model.hidden(tokens, positions, (positions < lengths[:, None]).astype(jnp.int32))
    hidden, targets = hidden[:, :-1], tokens[:, 1:]
    logp = token_log_probs(model, hidden, targets)
    streams = jax.nn.sigmoid(model.values(hidden, targets)) if model.cfg.value_head else None
    return logp, streams


@functools.partial(jax.jit, static_argnames=("graphdef", "head"))
def next_token_scores(graphdef: nnx.GraphDef, params, tokens: jax.Array, lengths: jax.Array, head: str) -> jax.Array:
    """(B, V) scores of every next token after each right-padded prompt of `lengths` tokens: the model's
    logits, or with `head="values"` the value head's stream logits."""
    model = nnx.merge(graphdef, params)
    last, _ = prefill_hidden(model, tokens, lengths, tokens.shape[1])
    return model.values(last) if head == "values" else model.logits(last)

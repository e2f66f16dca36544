"""Constrained page decoding inside jit: one prefill pass over the prompts, then a KV-cache loop on
`lax.while_loop`, either beam search (beams folded into the batch) or sampling.

Beam search has two objectives: `likelihood` (the page's log-probability under the model) and `streams`
(for a model with a value head: the page's predicted number of streams, each step adding the value head's
stream probability of the item placed, over the model's most likely candidates).

Prompts are right-padded to a common length P; padded slots have segment id 0 and are never attended
to. Generated token t of row r sits at cache slot P + t and RoPE position length[r] + t.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from homegen.data.vocab import EOS, PAD
from homegen.model.grammar import ItemTables, PageGrammar, PageRules, PageState
from homegen.model.transformer import KVCache, Transformer

NEG_INF = -1e30


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Decoded:
    """Per request, `n` pages best first: generated tokens (PAD after EOS), each token's log-probability
    (under the model for beam search, renormalised over the allowed tokens for sampling), the page's
    score, whether the slot holds a finished page, and each token's log-probability under the decoding
    policy itself (the propensity a page log records: 0 for beam search, which is deterministic; for
    sampling, under the tempered and top-k/top-p filtered distribution the token was drawn from)."""

    tokens: jax.Array  # (B, n, T)
    token_logps: jax.Array  # (B, n, T)
    scores: jax.Array  # (B, n): normalised log-probability, or predicted streams (+ prior) for `streams`
    valid: jax.Array  # (B, n)
    policy_logps: jax.Array  # (B, n, T)


OBJECTIVES = ("likelihood", "streams")
STREAM_CANDIDATES = 32  # `streams`: items considered per step (the model's most likely allowed ones)
PRIOR_WEIGHT = 0.01  # `streams`: weight of every token's log-probability next to predicted streams
ITEM_WIDTH = 1  # semantic IDs: hypotheses per beam inside an item (1: the beam is cut at every code)


def pad_prompts(prompts: list[list[int]], rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts right-padded into (rows, width) int32 tokens, with their lengths (1 for unused rows)."""
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones(rows, np.int32)
    for k, prompt in enumerate(prompts):
        tokens[k, :len(prompt)], lengths[k] = prompt, len(prompt)
    return tokens, lengths


def prefill_hidden(model: Transformer, prompts: jax.Array, lengths: jax.Array, slots: int
                   ) -> tuple[jax.Array, KVCache]:
    """Runs the prompts (B, P) through the model into a fresh cache of `slots` slots; returns the hidden
    state at each prompt's last real token (B, D) and the cache."""
    b, p = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    segments = (positions < lengths[:, None]).astype(jnp.int32)
    hidden, cache = model.hidden(prompts, positions, segments, KVCache.zeros(model.cfg, b, slots))
    return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0], cache


def prefill(model: Transformer, prompts: jax.Array, lengths: jax.Array, slots: int) -> tuple[jax.Array, KVCache]:
    """`prefill_hidden`, with the logits (B, V) at each prompt's last real token."""
    last, cache = prefill_hidden(model, prompts, lengths, slots)
    return model.logits(last), cache


def decode_hidden(model: Transformer, tokens: jax.Array, positions: jax.Array, cache: KVCache):
    """One token per row (R,) at RoPE positions (R,) -> hidden state (R, D) and the updated cache."""
    hidden, cache = model.hidden(tokens[:, None], positions[:, None], jnp.ones_like(tokens)[:, None], cache)
    return hidden[:, 0], cache


def decode_step(model: Transformer, tokens: jax.Array, positions: jax.Array, cache: KVCache):
    """`decode_hidden`, with the logits (R, V) instead of the hidden state."""
    hidden, cache = decode_hidden(model, tokens, positions, cache)
    return model.logits(hidden), cache


def boost_items(logits: jax.Array, rules: PageRules, item_offset: int) -> jax.Array:
    """`logits` (R, V) with each row's `rules.boost` added at the tokens of its `rules.boosted` items (atomic
    item IDs; -1 pads): the request's familiarity, a prior that multiplies those items' odds by e^boost
    before the grammar's mask. Rules without a familiarity bonus leave the logits as they are."""
    if rules.boosted is None:
        return logits
    target = jnp.where(rules.boosted >= 0, item_offset + rules.boosted, logits.shape[1])  # pads fall off the end
    return logits.at[jnp.arange(logits.shape[0])[:, None], target].add(rules.boost[:, None], mode="drop")


def constrained_logp(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Log-probabilities renormalised over the allowed tokens."""
    return jax.nn.log_softmax(jnp.where(mask, logits, NEG_INF), axis=-1)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT length normalisation: pages of different lengths compete on log_prob / penalty."""
    return ((5.0 + length) / 6.0) ** alpha


def _full_forward_hidden(model: Transformer, prompts, lengths, generated, step) -> jax.Array:
    """The hidden state after generated token `step` by running the whole sequence again (no KV cache)."""
    rows, p = prompts.shape
    t = generated.shape[1]
    tokens = jnp.concatenate([prompts, generated], axis=1)
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (rows, p)), lengths[:, None] + jnp.arange(t)], 1)
    segments = jnp.concatenate([jnp.arange(p)[None] < lengths[:, None], jnp.broadcast_to(jnp.arange(t) <= step, (rows, t))], 1)
    hidden, _ = model.hidden(tokens, positions, segments.astype(jnp.int32))
    return hidden[:, p + step]


def kth_largest(x: jax.Array, k: int, iterations: int = 40) -> jax.Array:
    """(R, 1): per row, a threshold t with exactly the row's k largest entries >= t (all entries when the
    row has fewer than k above NEG_INF / 2; ties at the k-th value all pass). Bisection on the values:
    `lax.top_k` with k > 1 is a sort on XLA:CPU and made each decoding step several times slower."""
    finite = x > NEG_INF / 2
    lo = jnp.min(jnp.where(finite, x, jnp.inf), axis=-1, keepdims=True)
    hi = jnp.max(jnp.where(finite, x, -jnp.inf), axis=-1, keepdims=True)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        enough = jnp.sum(x >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
    # lo keeps >= k entries; the smallest entry >= lo is the k-th largest (up to ties).
    return jnp.min(jnp.where(x >= lo, x, jnp.inf), axis=-1, keepdims=True)


def _step_scores(model: Transformer, hidden: jax.Array, mask: jax.Array, rules: PageRules, item_offset: int,
                 item_value: jax.Array, *, objective: str, candidates: int, prior_weight: float
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(score increment of every next token (R, V), NEG_INF where not allowed; its log-probability; the value
    head's stream probability of every token (R, V), or None for `likelihood`).

    `likelihood`: the increment is the model's log-probability (not renormalised over the allowed tokens:
    that favours hypotheses whose constraints leave few choices, and gave worse pages). `streams`: an item
    token among the `candidates` most likely allowed ones adds the value head's stream probability minus
    `item_value`, the probability already counted for the codes of the item in progress (0 at an item's
    first token): an atomic item adds its stream probability; a semantic ID's codes add the successive
    refinements of its prefix's, so the page's score counts each item's last-code probability once while
    every code choice already sees the value. Any token adds `prior_weight` x its log-probability (which
    alone orders shelves and EOS, and breaks ties); item tokens outside the candidates are pruned. The
    log-probabilities are those of the model with the rows' familiarity bonus (`boost_items`)."""
    logits = boost_items(model.logits(hidden), rules, item_offset)
    logp = jnp.where(mask, jax.nn.log_softmax(logits, axis=-1), NEG_INF)
    if objective == "likelihood":
        return logp, logp, None
    item_logp = logp[:, item_offset:]
    kth = kth_largest(item_logp, candidates)
    streams = jax.nn.sigmoid(model.values(hidden))
    gain = streams[:, item_offset:] - item_value[:, None]
    item_score = jnp.where((item_logp >= kth) & (item_logp > NEG_INF / 2), gain + prior_weight * item_logp, NEG_INF)
    other = jnp.where(logp[:, :item_offset] > NEG_INF / 2, prior_weight * logp[:, :item_offset], NEG_INF)
    return jnp.concatenate([other, item_score], axis=1), logp, streams


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BeamState:
    """Beam search after `step` tokens: A = K x item_width alive hypotheses per request (beams folded into the
    rows of `hidden`, `cache` and `fsm`; at most K of them between items) and the K best finished pages so
    far."""

    step: jax.Array  # scalar int32
    hidden: jax.Array  # (B * A, D) hidden state after each alive beam's last token
    cache: KVCache | None  # None when decoding without a cache
    fsm: PageState  # (B * A) grammar state of each alive beam
    alive_tokens: jax.Array  # (B, A, T)
    alive_logps: jax.Array  # (B, A, T)
    alive_score: jax.Array  # (B, A), NEG_INF for empty slots
    done_tokens: jax.Array  # (B, K, T)
    done_logps: jax.Array  # (B, K, T)
    done_score: jax.Array  # (B, K) normalised score, NEG_INF for empty slots
    item_value: jax.Array  # (B * A,) `streams`: stream probability counted for the item in progress


def cap_between_items(score: jax.Array, between_items: jax.Array, cap: int) -> jax.Array:
    """`score` (B, C), sorted best first per row, with every candidate between items (`between_items`: it
    ends an item, or is a shelf token) after the row's first `cap` such ones set to NEG_INF."""
    rank = jnp.cumsum(between_items & (score > NEG_INF / 2), axis=1)
    return jnp.where(between_items & (rank > cap), NEG_INF, score)


@functools.partial(jax.jit, static_argnames=("graphdef", "grammar", "beam_size", "max_new", "alpha", "use_cache",
                                             "objective", "candidates", "prior_weight", "item_width"))
def beam_search(graphdef: nnx.GraphDef, params, prompts, lengths, rules: PageRules, tables: ItemTables, *,
                grammar: PageGrammar,
                beam_size: int, max_new: int, alpha: float = 0.6, use_cache: bool = True,
                objective: str = "likelihood", candidates: int = STREAM_CANDIDATES,
                prior_weight: float = PRIOR_WEIGHT, item_width: int = ITEM_WIDTH) -> Decoded:
    """Top `beam_size` pages per request under `objective` (see `_step_scores`); the grammar's mask only
    prunes. `likelihood` ranks finished pages by length-normalised log-probability (GNMT `alpha`);
    `streams` by predicted streams, unnormalised (a longer page has more chances to be streamed).
    `use_cache=False` recomputes the whole sequence at every step (the baseline the cache is measured by).

    `item_width` W > 1 (semantic item IDs) searches item by item: inside an item's codes the beam holds
    `beam_size` x W hypotheses, and only when items complete is it cut back to `beam_size`, so an item is
    compared with other complete items rather than pruned with its cluster at its first code. A step costs
    W times the rows."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if item_width < 1 or (item_width > 1 and grammar.levels == 1):
        raise ValueError(f"item_width must be 1, or more for semantic item IDs (items of several codes); got "
                         f"{item_width} for items of {grammar.levels} token(s)")
    model = nnx.merge(graphdef, params)
    if objective == "streams" and not model.cfg.value_head:
        raise ValueError("the 'streams' objective needs a model trained with a value head")
    b, k, a = prompts.shape[0], beam_size, beam_size * item_width
    hidden, cache = prefill_hidden(model, prompts, lengths, prompts.shape[1] + max_new)
    rows_rules = grammar.prepare(rules.take(jnp.repeat(jnp.arange(b), a)), tables)
    row_prompts, row_lengths = jnp.repeat(prompts, a, axis=0), jnp.repeat(lengths, a)
    penalty = (lambda length: length_penalty(length, alpha)) if objective == "likelihood" else (lambda length: 1.0)
    empty_tokens, empty_logps = jnp.full((b, a, max_new), PAD, jnp.int32), jnp.zeros((b, a, max_new))
    state = BeamState(
        step=jnp.zeros((), jnp.int32), hidden=jnp.repeat(hidden, a, axis=0),
        cache=cache.repeat(a) if use_cache else None, fsm=grammar.init(rows_rules, tables, max_new),
        alive_tokens=empty_tokens, alive_logps=empty_logps,
        alive_score=jnp.tile(jnp.array([0.0] + [NEG_INF] * (a - 1)), (b, 1)),
        done_tokens=empty_tokens[:, :k], done_logps=empty_logps[:, :k], done_score=jnp.full((b, k), NEG_INF),
        item_value=jnp.zeros((b * a,)))
    last_level = grammar.item_offset + grammar.level_offsets[-1]  # item tokens below it leave an item open

    def running(s: BeamState) -> jax.Array:
        live = s.alive_score[:, 0] > NEG_INF / 2
        if objective == "streams":  # scores can still rise: run until every beam has finished
            return (s.step < max_new) & jnp.any(live)
        # Stop when no alive beam can still beat the worst finished page (log-probs only fall).
        best_alive = s.alive_score[:, 0] / penalty(jnp.float32(max_new))
        return (s.step < max_new) & jnp.any((best_alive > s.done_score[:, -1]) & live)

    def body(s: BeamState) -> BeamState:
        mask = grammar.allowed(s.fsm, rows_rules, tables)
        increments, logp, streams = _step_scores(model, s.hidden, mask, rows_rules, grammar.item_offset, s.item_value,
                                                 objective=objective, candidates=candidates,
                                                 prior_weight=prior_weight)
        vocab = logp.shape[-1]
        candidates_score = (s.alive_score[:, :, None] + increments.reshape(b, a, vocab)).reshape(b, a * vocab)
        top_score, top_index = jax.lax.top_k(candidates_score, 2 * a)
        top_beam, top_token = top_index // vocab, top_index % vocab
        beam_rows = jnp.arange(b)[:, None] * a + top_beam
        token_logp = logp[beam_rows, top_token]
        tokens = jnp.take_along_axis(s.alive_tokens, top_beam[:, :, None], 1).at[:, :, s.step].set(top_token)
        logps = jnp.take_along_axis(s.alive_logps, top_beam[:, :, None], 1).at[:, :, s.step].set(token_logp)
        live = top_score > NEG_INF / 2
        is_eos = (top_token == EOS) & live

        # Finished pages join the pool, ranked by normalised score.
        new_done = jnp.where(is_eos, top_score / penalty(s.step + 1.0), NEG_INF)
        done_score, keep = jax.lax.top_k(jnp.concatenate([s.done_score, new_done], 1), k)
        done_tokens = jnp.take_along_axis(jnp.concatenate([s.done_tokens, tokens], 1), keep[:, :, None], 1)
        done_logps = jnp.take_along_axis(jnp.concatenate([s.done_logps, logps], 1), keep[:, :, None], 1)

        # The best unfinished candidates go on: K between items, up to K x item_width inside one.
        open_score = jnp.where(is_eos | ~live, NEG_INF, top_score)
        if item_width > 1:
            open_score = cap_between_items(open_score, (top_token < grammar.item_offset) | (top_token >= last_level), k)
        alive_score, pick = jax.lax.top_k(open_score, a)
        chosen_beam = jnp.take_along_axis(top_beam, pick, 1)
        chosen_token = jnp.take_along_axis(top_token, pick, 1).reshape(-1)
        rows = (jnp.arange(b)[:, None] * a + chosen_beam).reshape(-1)
        alive_tokens = jnp.take_along_axis(tokens, pick[:, :, None], 1)
        cache = s.cache
        if use_cache:
            hidden, cache = decode_hidden(model, chosen_token, row_lengths + s.step, cache.take(rows))
        else:
            hidden = _full_forward_hidden(model, row_prompts, row_lengths, alive_tokens.reshape(b * a, -1), s.step)
        fsm = grammar.advance(s.fsm.take(rows), chosen_token, rows_rules, tables)
        item_value = s.item_value
        if streams is not None:  # the value counted so far for an item still in progress (semantic IDs)
            item_value = jnp.where(fsm.depth > 0, streams[rows, chosen_token], 0.0)
        return BeamState(step=s.step + 1, hidden=hidden, cache=cache, fsm=fsm,
                         alive_tokens=alive_tokens, alive_logps=jnp.take_along_axis(logps, pick[:, :, None], 1),
                         alive_score=alive_score, done_tokens=done_tokens, done_logps=done_logps,
                         done_score=done_score, item_value=item_value)

    s = jax.lax.while_loop(running, body, state)
    valid = s.done_score > NEG_INF / 2
    logps = jnp.where(valid[:, :, None], s.done_logps, 0.0)
    return Decoded(s.done_tokens, logps, s.done_score, valid, jnp.zeros_like(logps))


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature, then top-k (0 = off) and nucleus top-p (1 = off) filtering, per row."""
    logits = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, logits.shape[-1]), logits.shape[-1])
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1) - probs  # mass before each token
    cutoff = jnp.min(jnp.where(cumulative < top_p[:, None], ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((logits >= kth) & (logits >= cutoff), logits, NEG_INF)


@functools.partial(jax.jit, static_argnames=("graphdef", "grammar", "max_new"))
def sample(graphdef: nnx.GraphDef, params, prompts, lengths, rules: PageRules, tables: ItemTables, seeds,
           temperature, top_k, top_p, *, grammar: PageGrammar, max_new: int) -> Decoded:
    """One sampled page per row, reproducible by each row's seed."""
    model = nnx.merge(graphdef, params)
    b = prompts.shape[0]
    logits, cache = prefill(model, prompts, lengths, prompts.shape[1] + max_new)
    keys = jax.vmap(jax.random.key)(seeds)
    rules = grammar.prepare(rules, tables)

    def running(s):
        return (s["step"] < max_new) & ~jnp.all(s["fsm"].done)

    def body(s):
        step = s["step"]
        mask = grammar.allowed(s["fsm"], rules, tables)
        boosted = boost_items(s["logits"], rules, grammar.item_offset)
        filtered = filter_logits(jnp.where(mask, boosted, NEG_INF), temperature, top_k, top_p)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        drawn_from = jnp.where(mask, filtered, NEG_INF)
        token = jax.vmap(jax.random.categorical)(step_keys, drawn_from)
        token = jnp.where(s["fsm"].done, PAD, token)
        logp = jnp.take_along_axis(constrained_logp(boosted, mask), token[:, None], 1)[:, 0]
        logp = jnp.where(s["fsm"].done, 0.0, logp)
        policy_logp = jnp.take_along_axis(jax.nn.log_softmax(drawn_from), token[:, None], 1)[:, 0]
        policy_logp = jnp.where(s["fsm"].done, 0.0, policy_logp)
        fsm = grammar.advance(s["fsm"], token, rules, tables)
        logits, cache = decode_step(model, token, lengths + step, s["cache"])
        return dict(step=step + 1, logits=logits, cache=cache, fsm=fsm,
                    tokens=s["tokens"].at[:, step].set(token), logps=s["logps"].at[:, step].set(logp),
                    policy_logps=s["policy_logps"].at[:, step].set(policy_logp))

    s = jax.lax.while_loop(running, body, dict(
        step=jnp.zeros((), jnp.int32), logits=logits, cache=cache, fsm=grammar.init(rules, tables, max_new),
        tokens=jnp.full((b, max_new), PAD, jnp.int32), logps=jnp.zeros((b, max_new)),
        policy_logps=jnp.zeros((b, max_new))))
    valid = s["fsm"].done
    return Decoded(s["tokens"][:, None], s["logps"][:, None], s["logps"].sum(-1)[:, None], valid[:, None],
                   s["policy_logps"][:, None])


@functools.partial(jax.jit, static_argnames=("graphdef", "level_starts", "level_sizes", "beam_size"))
def item_beam_search(graphdef: nnx.GraphDef, params, prompts, lengths, children, excluded, *,
                     level_starts: tuple[int, ...], level_sizes: tuple[int, ...], beam_size: int):
    """The `beam_size` most likely next items per prompt, decoding one code per level along the trie of
    valid code tuples (`children`, see `data.semantic_ids.item_trie`); code c of level l is token
    `level_starts[l] + c`. Log-probabilities are renormalised over the codes the trie allows, and items
    marked in `excluded` (B, num_items) are never completed. Returns item indices (B, beam_size), best
    first (-1 in slots no item reached), and their log-probabilities."""
    model = nnx.merge(graphdef, params)
    b, k, levels = prompts.shape[0], beam_size, len(level_sizes)
    logits, cache = prefill(model, prompts, lengths, prompts.shape[1] + levels)
    logits = jnp.repeat(logits, k, axis=0)
    cache = cache.repeat(k)
    request = jnp.arange(b * k) // k
    node = jnp.zeros(b * k, jnp.int32)
    score = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (b, 1))
    for level, (start, size) in enumerate(zip(level_starts, level_sizes)):
        child = children[node, :size]
        allowed = child >= 0
        if level == levels - 1:
            allowed &= ~excluded[request[:, None], jnp.maximum(child, 0)]
        logp = jnp.where(allowed, constrained_logp(logits[:, start:start + size], allowed), NEG_INF)
        candidates = (score[:, :, None] + logp.reshape(b, k, size)).reshape(b, k * size)
        score, index = jax.lax.top_k(candidates, k)
        rows = (jnp.arange(b)[:, None] * k + index // size).reshape(-1)
        code = (index % size).reshape(-1)
        node = child[rows, code]
        if level < levels - 1:
            logits, cache = decode_step(model, start + code, lengths[request] + level, cache.take(rows))
    found = score > NEG_INF / 2
    return jnp.where(found, node.reshape(b, k), -1), jnp.where(found, score, NEG_INF)

"""Restores a checkpoint and turns page requests into pages with constrained decoding."""

from __future__ import annotations

import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from homegen.data.formats import Shelf, read_catalog
from homegen.data.relabel import BEST_OUTCOME, OUTCOME_FIELD, USER_FIELD
from homegen.data.semantic_ids import catalog_attributes
from homegen.data.vocab import EOS, PAD, Vocabulary
from homegen.model.decoding import (
    ITEM_WIDTH,
    OBJECTIVES,
    PRIOR_WEIGHT,
    STREAM_CANDIDATES,
    beam_search,
    pad_prompts,
    sample,
)
from homegen.model.grammar import PageGrammar, PageRules
from homegen.model.scoring import next_token_scores, score_tokens
from homegen.model.transformer import TransformerConfig, abstract_model
from homegen.serving.buckets import ShapeBuckets, smallest_at_least
from homegen.serving.eligibility import Eligibility
from homegen.serving.requests import PageRequest, RequestError
from homegen.serving.validity import PageValidator
from homegen.training.checkpoints import CheckpointError, Checkpoints, checkpoint_dir


def _restore_model(checkpoints: Checkpoints, step: int) -> tuple[dict, nnx.GraphDef, dict]:
    """(metadata, graphdef, parameters on this process's first device) of a checkpoint step."""
    _, meta = checkpoints.read_meta(step)
    graphdef, abstract, _ = abstract_model(TransformerConfig(**meta["model"]))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return meta, graphdef, checkpoints.restore_model_params(step, target)[1]


INDEX_LISTS = ("extra_items", "extra_shelves", "excluded", "boosted")  # PageRules fields padded with -1


def _bucket(n: int, minimum: int, factor: int = 2) -> int:
    """The smallest minimum x factor^k >= n: padded sizes from a short list, so that few shapes compile."""
    size = minimum
    while size < n:
        size *= factor
    return size


def stack_rules(rules: list[dict[str, np.ndarray]], rows: int, width: int | None = None) -> PageRules:
    """One PageRules for `rows` rows from per-request rules (`PageEngine._rules`): index lists padded with -1
    to a bucketed common length (or to `width`, history-dependent pairs beyond it dropped: a smaller eligible
    set, still valid pages), unused rows repeating the first request."""
    rules = rules + [rules[0]] * (rows - len(rules))
    stacked = {}
    for key in rules[0]:
        if key in INDEX_LISTS:
            size = width or _bucket(max(len(r[key]) for r in rules), 64, factor=4)  # 64, 256, 1024, ...
            stacked[key] = np.stack([np.pad(r[key][:size], (0, size - len(r[key][:size])), constant_values=-1)
                                     for r in rules])
        else:
            stacked[key] = np.stack([r[key] for r in rules])
    return PageRules(**{k: jnp.asarray(v) for k, v in stacked.items()})


class PageEngine:
    """Everything needed to serve one checkpoint: parameters, vocabulary, grammar, eligibility, catalog.

    Public: `generate` and `score` (responses are FORMATS.md §4 dictionaries, the fields of
    `serving.schemas.PageResponseBody` and `ScoredPageBody`), `prompt`, the checkpoint's view below
    "what the checkpoint knows" (item ids, shelf types, eligibility, a page validator, the world), `step`,
    `objective`, `model_cfg`, `train_config`, and `vocab` for token-level tools (the Vocabulary's own API).
    Grammar, device tables, parameters and eligibility internals are the engine's own."""

    def __init__(self, path: str, step: int | None = None, use_cache: bool = True, objective: str = "auto",
                 buckets: ShapeBuckets | None = None, stream_candidates: int | None = None,
                 prior_weight: float | None = None, item_width: int | None = None):
        """`objective` of beam search: `likelihood`, `streams` (needs a value head) or `auto` (`streams`
        when the checkpoint has a value head). With `buckets` every request decodes in one of their shapes
        (compile them first with `warm_up`); without, shapes follow the requests. `stream_candidates` and
        `prior_weight` (`streams` beam search) and `item_width` (beam search over semantic IDs, see
        `model.decoding.beam_search`) override the checkpoint config's `serve` settings."""
        self.buckets = buckets
        self.use_cache = use_cache  # False: recompute every step (only to measure what the cache buys)
        checkpoints = Checkpoints(checkpoint_dir(path), read_only=True)
        self.step, (meta, self.graphdef, self.params) = checkpoints.first_readable(
            lambda s: _restore_model(checkpoints, s), step)
        self.model_cfg = TransformerConfig(**meta["model"])
        self.train_config = meta["config"]  # the config the checkpoint was trained with
        self.seq_len = int(meta["config"]["data"]["seq_len"])  # the training rows' length: prompts stay within
        self.path = path
        self.objective = self._check_objective(objective)
        self.candidates, self.prior_weight, self.item_width = self._search_settings(
            stream_candidates, prior_weight, item_width)
        self.eligibility_spec = meta.get("eligibility") or {"kind": "all"}
        self.catalog = (meta.get("catalog") or {}).get("items", {})
        self._lock = threading.RLock()  # a catalog refresh waits for the batch being decoded
        self._use_vocabulary(Vocabulary.from_json(meta["vocab"]))
        if self.item_width > 1 and self.grammar.levels == 1:
            raise ValueError(f"item_width {self.item_width} needs semantic item IDs; this checkpoint has one token "
                             "per item (atomic item IDs), whose beam already compares whole items: use 1")

    def _search_settings(self, candidates: int | None, prior_weight: float | None,
                         item_width: int | None) -> tuple[int, float, int]:
        """`streams` beam search's candidates per step and log-probability weight, and beam search's item
        width: the arguments, else the checkpoint config's `serve` section (older checkpoints: the decoder's
        defaults)."""
        chosen = self.train_config.get("serve") or {}
        candidates = int(chosen.get("stream_candidates", STREAM_CANDIDATES) if candidates is None else candidates)
        prior_weight = float(chosen.get("prior_weight", PRIOR_WEIGHT) if prior_weight is None else prior_weight)
        item_width = int(chosen.get("item_width", ITEM_WIDTH) if item_width is None else item_width)
        if candidates < 1 or prior_weight < 0 or item_width < 1:
            raise ValueError(f"beam search needs stream_candidates >= 1, prior_weight >= 0 and item_width >= 1, "
                             f"got {candidates}, {prior_weight} and {item_width}")
        return candidates, prior_weight, item_width

    @property
    def search_settings(self) -> dict:
        """Beam search's settings in force, as `PageEngine` keyword arguments (a reload keeps them)."""
        return {"stream_candidates": self.candidates, "prior_weight": self.prior_weight,
                "item_width": self.item_width}

    def _use_vocabulary(self, vocab: Vocabulary) -> None:
        """The vocabulary and everything decoding derives from it: grammar, eligibility and device tables."""
        grammar = PageGrammar.for_vocabulary(vocab)
        eligibility = Eligibility(self.eligibility_spec, vocab)
        codes = vocab.items.code_table() if grammar.levels > 1 else None
        tables = grammar.tables(eligibility.static, codes)  # on the device once; requests add index lists
        self.vocab, self.grammar, self.eligibility, self.tables = vocab, grammar, eligibility, tables

    def refresh_catalog(self, path: str) -> dict:
        """Adds the items of catalog file `path` (FORMATS.md §2) that the checkpoint does not know, without
        retraining: semantic IDs code them from their metadata (artist, genres, release month, title) and
        they may then stand on every shelf whose rule admits them. Returns {"added", "items",
        "placeable"} (how many new items some shelf admits). Raises ValueError for an atomic checkpoint
        (a new item has no token) or a catalog the checkpoint's semantic IDs cannot code."""
        return self.add_catalog(read_catalog(path), path)

    def add_catalog(self, catalog: dict, source: str) -> dict:
        """`refresh_catalog` for records already read (`read_catalog`'s result); `source` names them in
        errors."""
        with self._lock:  # one refresh at a time, never beside a batch being decoded or scored
            return self._add_items(catalog, source)

    def _add_items(self, catalog: dict, path: str) -> dict:
        new = [item for item in catalog if item not in self.vocab.items.index]
        if new and self.grammar.levels == 1:
            raise ValueError(f"{len(new)} new items in {path}, but this checkpoint has one token per item "
                             "(atomic item IDs): new items need retraining, or a model trained with semantic IDs")
        if not new:
            return {"added": 0, "items": self.vocab.items.num_items, "placeable": 0}
        attributes = catalog_attributes({item: catalog[item] for item in new}, self.vocab.sp.encode_as_pieces)
        items = self.vocab.items.add(new, [attributes[item] for item in new])
        self._use_vocabulary(self.vocab.with_items(items))
        self.catalog.update({item: catalog[item].display() for item in new})
        rows = [self.vocab.items.index[item] for item in new]
        placeable = int(self.eligibility.static[:, rows].any(axis=0).sum())
        return {"added": len(new), "items": self.vocab.items.num_items, "placeable": placeable}

    def _check_objective(self, objective: str) -> str:
        if objective == "auto":
            return "streams" if self.model_cfg.value_head else "likelihood"
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be 'auto' or one of {OBJECTIVES}, got {objective!r}")
        if objective == "streams" and not self.model_cfg.value_head:
            raise CheckpointError(f"{self.path} has no value head; beam search can only maximise likelihood")
        return objective

    # --- request -> arrays ----------------------------------------------------------------------------
    def request_rules(self, request: PageRequest) -> dict[str, np.ndarray]:
        """The request's constraints as short arrays (none of them grows with the catalog)."""
        vocab = self.vocab
        shelves = np.ones(len(vocab.shelves), bool)
        if request.allowed_shelves is not None:
            unknown = [s for s in request.allowed_shelves if s not in vocab.shelves]
            if unknown:
                raise RequestError(f"unknown shelves {unknown}; known: {vocab.shelves}")
            shelves[:] = False
            shelves[[vocab.shelves.index(s) for s in request.allowed_shelves]] = True
        index = vocab.items.index
        excluded = np.array(sorted({index[item] for item in request.exclude_items if item in index}), np.int32)
        extra_shelves, extra_items = self.eligibility.dynamic_pairs(request.history)
        left = self.eligibility.static_counts - self.eligibility.static[:, excluded].sum(axis=1)
        left += np.bincount(extra_shelves[~np.isin(extra_items, excluded)], minlength=len(vocab.shelves))
        if not ((left >= request.min_items_per_shelf) & shelves).any():
            raise RequestError(f"no allowed shelf has {request.min_items_per_shelf} eligible items left "
                               "after exclusions")
        return {"extra_items": extra_items, "extra_shelves": extra_shelves, "excluded": excluded,
                "allowed_shelves": shelves, "min_items": np.int32(request.min_items_per_shelf),
                "max_items": np.int32(request.max_items_per_shelf), "max_shelves": np.int32(request.num_shelves),
                "boosted": self._familiar_items(request), "boost": np.float32(request.familiarity)}

    def _familiar_items(self, request: PageRequest) -> np.ndarray:
        """The items whose logits the request's `familiarity` raises: its history's known items, newest first
        (a bucket's index width keeps the newest); none when `familiarity` is 0."""
        if not request.familiarity:
            return np.zeros(0, np.int32)
        if self.grammar.levels > 1:
            raise RequestError("'familiarity' needs a checkpoint with one token per item (atomic item IDs); this "
                               "one writes items as semantic ID codes")
        index = self.vocab.items.index
        return np.array([index[item] for item in dict.fromkeys(reversed(request.history)) if item in index], np.int32)

    def prompt(self, request: PageRequest) -> list[int]:
        """The request's prompt tokens; a model trained with user tokens sees the request's user (the
        unknown-user token for a user it was not trained on); a model trained with outcome conditioning is
        asked for the best outcome bucket unless the request's context names one. The intent keeps as many
        pieces as fit in a training row beside the rest of the prompt and the longest page the request allows
        (none when nothing fits), so a prompt never outgrows what the model was trained on."""
        context = {**request.context, USER_FIELD: request.user_id}  # ignored by vocabularies without user tokens
        if self.vocab.conditions_on_outcome() and OUTCOME_FIELD not in context:
            context = {**context, OUTCOME_FIELD: BEST_OUTCOME}
        without_intent = self.vocab.encode_prompt(context, None, request.history)
        if not request.intent:
            return without_intent
        page = self.grammar.max_length(request.num_shelves, request.max_items_per_shelf)
        room = max(self.seq_len - len(without_intent) - page, 0)
        if self.buckets:  # and within the server's one prompt buffer
            room = min(room, self.prompt_length - len(without_intent))
        return self.vocab.encode_prompt(context, request.intent, request.history, max_intent_tokens=room)

    def _batch(self, requests: list[PageRequest], rules: list[dict[str, np.ndarray]]):
        """Prompts and rules of a group, padded to bucketed shapes (rows, prompt length) so that few shapes
        compile (with `buckets`, to theirs)."""
        prompts = [self.prompt(r) for r in requests]
        if self.buckets:
            rows, length = smallest_at_least(self.buckets.rows, len(requests)), self.prompt_length
            width = self.buckets.index_width
        else:
            rows, length, width = _bucket(len(requests), 1), _bucket(max(len(p) for p in prompts), 16), None
        tokens, lengths = pad_prompts(prompts, rows, length)
        return jnp.asarray(tokens), jnp.asarray(lengths), stack_rules(rules, rows, width)

    @property
    def prompt_length(self) -> int:
        """The one padded prompt length with `buckets`: the longest prompt without an intent plus
        `buckets.intent_tokens` intent pieces, at most a training row (unless the prompt without an intent is
        longer), in multiples of 16. Every decoding step attends to the whole buffer, so it is no longer than
        that."""
        longest = 4 + len({t.split("=", 1)[0] for t in self.vocab.context_tokens}) + \
            self.vocab.max_history * self.vocab.items.tokens_per_item
        return -(-max(longest, min(longest + self.buckets.intent_tokens, self.seq_len)) // 16) * 16

    def warm_up(self) -> dict[str, float]:
        """Compiles every shape of `buckets` (decoding a throwaway batch of each); returns how many and the
        seconds it took."""
        start = time.perf_counter()
        shapes = self.buckets.shapes()
        with self._lock:
            for mode, width, rows, page in shapes:
                fields = {"beam_size": width} if mode == "beam" else {"temperature": 1.0, "num_pages": width,
                                                                       "beam_size": width}
                # A one-item page, decoded in the page buffer of `page`: quick, and the shape is compiled.
                request = PageRequest(user_id="warm-up", num_shelves=1, min_items_per_shelf=1, max_items_per_shelf=1,
                                      **fields).with_session()
                key = (mode, width, *page, self.objective if mode == "beam" else None)
                self._generate_group(key, [request] * rows, [self.request_rules(request)] * rows)
        return {"shapes": len(shapes), "seconds": time.perf_counter() - start}

    # --- decoding -------------------------------------------------------------------------------------
    def generate(self, requests: list[PageRequest], objective: str | None = None) -> list[dict]:
        """One response (FORMATS.md §4) per request, in order; a request that cannot be served gets
        {"error": reason}. Requests are grouped by decoding mode and page shape, so each group decodes as
        one batch. Beam search uses `objective` (default: the engine's)."""
        with self._lock:
            return self._generate(requests, objective)

    def _generate(self, requests: list[PageRequest], objective: str | None) -> list[dict]:
        objective = self._check_objective(objective) if objective else self.objective
        requests = list(requests)
        responses: list[dict | None] = [None] * len(requests)
        rules: dict[int, dict[str, np.ndarray]] = {}
        groups: dict[tuple, list[int]] = {}
        for k, r in enumerate(requests):
            requests[k] = r = r.with_session()
            try:
                if self.buckets:
                    requests[k] = r = self.buckets.fit(r)
                rules[k] = self.request_rules(r)
            except RequestError as e:
                responses[k] = {"error": str(e)}
                continue
            if self.buckets:  # the first of the server's page buffers that holds the page
                shape, width = self.buckets.page_shape(r), self.buckets.width(r)
            else:
                shape, width = (r.num_shelves, r.max_items_per_shelf), r.beam_size if r.temperature == 0 else r.num_pages
            key = ("beam", width, *shape, objective) if r.temperature == 0 else ("sample", width, *shape, None)
            groups.setdefault(key, []).append(k)
        for key, members in groups.items():
            group = self._generate_group(key, [requests[k] for k in members], [rules[k] for k in members])
            for k, response in zip(members, group):
                responses[k] = response
        return responses

    def _generate_group(self, key: tuple, requests: list[PageRequest], request_rules: list[dict]) -> list[dict]:
        mode, width, num_shelves, max_items, objective = key
        max_new = self.grammar.max_length(num_shelves, max_items)
        tokens, lengths, rules = self._batch(requests, request_rules)
        if mode == "beam":
            out = beam_search(self.graphdef, self.params, tokens, lengths, rules, self.tables, grammar=self.grammar,
                              beam_size=width, max_new=max_new, use_cache=self.use_cache, objective=objective,
                              candidates=self.candidates, prior_weight=self.prior_weight,
                              item_width=self.item_width)
        else:
            repeat = lambda x: jnp.repeat(x, width, axis=0)  # noqa: E731
            rows = tokens.shape[0]
            pad = rows - len(requests)
            # the j-th page of a request's seed; every seed up to 2^31 - 1 stays an int32
            seeds = [(r.seed * 1000 + j) % 2**31 for r in requests for j in range(width)] + [0] * (pad * width)
            params = [(r.temperature, r.top_k, r.top_p) for r in requests] + [(1.0, 0, 1.0)] * pad
            temperature, top_k, top_p = (jnp.asarray(np.repeat([p[i] for p in params], width)) for i in range(3))
            out = sample(self.graphdef, self.params, repeat(tokens), repeat(lengths), jax.tree.map(repeat, rules),
                         self.tables, jnp.asarray(seeds, jnp.int32), temperature.astype(jnp.float32), top_k.astype(jnp.int32),
                         top_p.astype(jnp.float32), grammar=self.grammar, max_new=max_new)
            out = jax.tree.map(lambda x: x.reshape(rows, width, *x.shape[2:]), out)
            order = jnp.argsort(-out.scores, axis=1)
            out = jax.tree.map(lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1), out)
        out = jax.device_get(out)
        # The propensities a page log needs are exact for beam search (deterministic: 1) and for one sampled
        # page per request; the best of several samples has no tractable probability, so it carries none.
        exact = mode == "beam" or width == 1
        results = []
        for row, request in enumerate(requests):
            pages = [self._page(out.tokens[row, j], out.token_logps[row, j],
                                out.policy_logps[row, j] if exact else None)
                     for j in range(out.tokens.shape[1]) if out.valid[row, j]][:request.num_pages]
            if not pages:
                results.append({"error": "no valid page could be decoded for this request"})
                continue
            best = pages[0]
            response = {**({"request_id": request.request_id} if request.request_id else {}),
                        "user_id": request.user_id, "page": best["page"], "log_prob": best["log_prob"],
                        "checkpoint_step": self.step}
            if "log_propensity" in best:
                response["log_propensity"] = best["log_propensity"]
            if mode == "beam" and objective == "streams":  # the score less its log-prob prior
                prior = self.prior_weight * float(out.token_logps[row, 0].sum())
                response["predicted_streams"] = round(float(out.scores[row, 0]) - prior, 4)
            if request.num_pages > 1:
                response["pages"] = pages
            results.append(response)
        return results

    def _page(self, tokens: np.ndarray, logps: np.ndarray, policy_logps: np.ndarray | None = None) -> dict:
        """A decoded page: shelves with their items, each item's log-probability (the sum over its tokens)
        and the page's; with `policy_logps`, also each item's propensity (the decoding policy's probability of
        the item in its slot given everything before it, FORMATS.md §3) and the page's log-propensity."""
        page, total, codes, item_logp = [], 0.0, [], 0.0
        with_policy = policy_logps is not None
        policy = policy_logps if with_policy else np.zeros(len(tokens))
        page_policy, item_policy = 0.0, 0.0
        for token, logp, policy_logp in zip(tokens.tolist(), logps.tolist(), policy.tolist()):
            if token in (PAD, EOS):
                total += logp if token == EOS else 0.0
                page_policy += policy_logp if token == EOS else 0.0
                if token == EOS:
                    break
                continue
            total += logp
            page_policy += policy_logp
            if self.vocab.is_shelf(token):
                page.append({"shelf": self.vocab.shelves[token - self.vocab.shelf_offset], "items": [], "item_scores": [],
                             **({"propensities": []} if with_policy else {})})
                continue
            codes.append(token - self.vocab.item_offset)
            item_logp += logp
            item_policy += policy_logp
            if len(codes) == self.vocab.items.tokens_per_item:
                page[-1]["items"].append(self.vocab.items.decode(codes))
                page[-1]["item_scores"].append(round(item_logp, 4))
                if with_policy:
                    page[-1]["propensities"].append(float(f"{max(math.exp(item_policy), 1e-300):.6g}"))
                codes, item_logp, item_policy = [], 0.0, 0.0
        decoded = {"page": page, "log_prob": round(total, 4)}
        if with_policy:
            decoded["log_propensity"] = round(min(page_policy, 0.0), 6)
        return decoded

    # --- scoring given pages ----------------------------------------------------------------------------
    def score(self, requests: list[PageRequest], pages: list[list[dict]], batch_size: int = 32) -> list[dict]:
        """Teacher-forced scores of given pages (lists of {"shelf", "items"}), one per request: the page with
        each item's log-probability (`item_scores`), each shelf token's (`shelf_score`), the page's
        log-probability `log_prob` (EOS included,
        under the model, as beam search reports it) and, with a value head, each item's predicted stream
        probability (`stream_probs`) and their sum `predicted_streams`. A page with a shelf or item the
        vocabulary lacks gets {"error": reason}. Pages are scored as given, valid or not."""
        with self._lock:
            return self._score(requests, pages, batch_size)

    def _score(self, requests: list[PageRequest], pages: list[list[dict]], batch_size: int) -> list[dict]:
        results: list[dict | None] = [None] * len(requests)
        rows = []  # (request index, prompt, page tokens)
        for k, (request, page) in enumerate(zip(requests, pages, strict=True)):
            request = request.with_session()
            unknown = [s["shelf"] for s in page if self.vocab.shelf_token(s["shelf"]) is None]
            unknown += [i for s in page for i in s["items"] if self.vocab.item_tokens(i) is None]
            if unknown or not page:
                results[k] = {"error": f"unknown shelves or items: {unknown[:10]}" if unknown else "empty page"}
                continue
            body = self.vocab.encode_page([Shelf(s["shelf"], list(s["items"])) for s in page]).tokens.tolist()
            rows.append((k, self.prompt(request), body))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = _bucket(max(len(p) + len(b) for _, p, b in chunk), 16)
            tokens, lengths = pad_prompts([p + b for _, p, b in chunk], batch_size, width)
            logp, streams = jax.device_get(score_tokens(self.graphdef, self.params, tokens, lengths))
            for row, (k, prompt, body) in enumerate(chunk):
                span = slice(len(prompt) - 1, len(prompt) - 1 + len(body))
                results[k] = self._scored_page(body, logp[row, span], None if streams is None else streams[row, span])
        return results

    def _scored_page(self, tokens: list[int], logps: np.ndarray, streams: np.ndarray | None) -> dict:
        out = self._page(np.asarray(tokens), logps)
        shelf_scores = [float(p) for token, p in zip(tokens, logps) if self.vocab.is_shelf(token)]
        for shelf, score in zip(out["page"], shelf_scores, strict=True):
            shelf["shelf_score"] = round(score, 4)
        if streams is not None:
            # An item's stream probability is the value head's at its last token (the full code tuple).
            last = self.vocab.item_offset + self.grammar.level_offsets[-1]
            item_probs = [float(p) for token, p in zip(tokens, streams) if token >= last]
            out["predicted_streams"] = round(sum(item_probs), 4)
            remaining = iter(item_probs)
            for shelf in out["page"]:
                shelf["stream_probs"] = [round(next(remaining), 4) for _ in shelf["items"]]
        return out

    # --- what the checkpoint knows: the public view for scripts and evaluation --------------------------
    @property
    def item_ids(self) -> list[str]:
        """The item ids the checkpoint can place (items of refreshed catalogs included), in token order; the
        engine's own list, not to be modified."""
        return self.vocab.items.item_ids

    @property
    def shelf_types(self) -> list[str]:
        """The shelf types the checkpoint knows, in token order (the rows of `eligible`)."""
        return self.vocab.shelves

    @property
    def semantic_ids(self) -> bool:
        """True when items are tuples of semantic codes (several tokens each), False for one token per item."""
        return self.grammar.levels > 1

    @property
    def has_value_head(self) -> bool:
        """Whether the model predicts each item's stream probability (the `streams` objective needs it)."""
        return bool(self.model_cfg.value_head)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    def knows_shelf(self, shelf: str) -> bool:
        return self.vocab.shelf_token(shelf) is not None

    def knows_item(self, item: str) -> bool:
        return self.vocab.item_tokens(item) is not None

    def eligible(self, history: list[str]) -> np.ndarray:
        """(shelf types, items) bool: the items each shelf type admits for a user with `history` (the
        checkpoint's eligibility rules, history-dependent pools included)."""
        return self.eligibility.matrix(history)

    def validator(self) -> PageValidator:
        """An independent checker of this checkpoint's pages (grammar, duplicates, eligibility, exclusions)."""
        return PageValidator(self.vocab, self.eligibility_spec)

    def max_page_tokens(self, num_shelves: int, max_items_per_shelf: int) -> int:
        """The most tokens a page of this shape takes (the decoder's `max_new`)."""
        return self.grammar.max_length(num_shelves, max_items_per_shelf)

    def page_tokens(self, page: list[dict]) -> list[int]:
        """The token sequence of a page ([{"shelf", "items"}, ...]; EOS included), as the model reads it."""
        return self.vocab.encode_page([Shelf(s["shelf"], list(s["items"])) for s in page]).tokens.tolist()

    def item_ends(self, tokens: list[int]) -> np.ndarray:
        """bool per token of `page_tokens`' output: True at each item's last token (where its stream
        probability is predicted)."""
        return np.asarray(tokens) >= self.vocab.item_offset + self.grammar.level_offsets[-1]

    def first_slot_scores(self, requests: list[PageRequest], shelves: list[str], head: str = "logits",
                          batch: int = 64) -> np.ndarray:
        """(len(requests), items) each item's score in the first slot of shelf `shelves[k]` of request k
        (right after the shelf token): the model's next-item logits, or with `head="values"` the value head's
        stream logits. One token per item only (a semantic item's score is a path through the code trie)."""
        if self.semantic_ids:
            raise ValueError("first-slot scores need one token per item; this checkpoint has semantic item IDs")
        sequences = [self.prompt(r) + [self.vocab.shelf_token(name)] for r, name in zip(requests, shelves, strict=True)]
        width, first = max(map(len, sequences), default=1), self.vocab.item_offset
        scores = [np.zeros((0, self.vocab.items.num_tokens), np.float32)]
        for start in range(0, len(sequences), batch):
            chunk = sequences[start:start + batch]
            tokens, lengths = pad_prompts(chunk, batch, width)
            scores.append(np.asarray(next_token_scores(self.graphdef, self.params, tokens, lengths, head))
                          [:len(chunk), first:])
        return np.concatenate(scores)

    @property
    def world(self):
        """The synthetic world the checkpoint was trained in (its users, rules and response model), or None for
        a checkpoint of other data."""
        return getattr(self.eligibility, "world", None)

    @property
    def shelf_rules(self):
        """The synthetic world's shelf rules (`ShelfRules`), or None for a checkpoint of other data."""
        return getattr(self.eligibility, "rules", None)

    def describe(self, item_id: str) -> dict:
        """Display fields of an item from the catalog saved in the checkpoint."""
        return self.catalog.get(item_id, {})

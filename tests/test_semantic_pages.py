"""Constrained page decoding with semantic item IDs (items as code tuples along a trie): the grammar accepts
exactly the valid pages of a tiny catalog (checked against brute-force enumeration), beam search finds the
brute-force best page, decoded pages never repeat or misplace an item under random requests, and a
checkpoint trained with semantic IDs on the synthetic world is served in every mode, evaluated, and places
items released after training once a catalog refresh adds them."""

import itertools
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_STEPS, params_of, running_server
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import assert_valid, request_strategy

from homegen.data.builders import SyntheticWorldDataset
from homegen.data.semantic_ids import SemanticItems
from homegen.data.vocab import EOS, PAD
from homegen.model.decoding import beam_search, length_penalty, sample
from homegen.model.grammar import PageGrammar, PageRules
from homegen.model.transformer import Transformer, TransformerConfig
from homegen.serving.app import ServerSettings
from homegen.serving.engine import PageEngine
from homegen.serving.requests import parse_request
from homegen.serving.validity import PageValidator

SHELF_OFFSET = 5  # tokens 0..4 are the specials


def semantic_grammar(codes: np.ndarray, shelves: int) -> tuple[PageGrammar, SemanticItems]:
    items = SemanticItems([f"i{k}" for k in range(len(codes))], codes)
    item_offset = SHELF_OFFSET + shelves
    grammar = PageGrammar(vocab_size=item_offset + items.num_tokens, shelf_offset=SHELF_OFFSET, num_shelves=shelves,
                          item_offset=item_offset, num_items=items.num_items, level_sizes=tuple(items.level_sizes))
    return grammar, items


def page_rules(shelves: int, extra=(), excluded=(), allowed=None, min_items=1, max_items=2, max_shelves=2,
               rows=1) -> PageRules:
    width = max(len(extra), len(excluded), 1)
    pad = lambda xs: np.tile(np.array(list(xs) + [-1] * (width - len(xs)), np.int32), (rows, 1))  # noqa: E731
    allowed = np.ones(shelves, bool) if allowed is None else np.asarray(allowed)
    return PageRules(jnp.asarray(pad([i for _, i in extra])), jnp.asarray(pad([s for s, _ in extra])),
                     jnp.asarray(pad(sorted(excluded))), jnp.asarray(np.tile(allowed, (rows, 1))),
                     jnp.full((rows,), min_items, jnp.int32), jnp.full((rows,), max_items, jnp.int32),
                     jnp.full((rows,), max_shelves, jnp.int32))


def accepted_pages(grammar: PageGrammar, rules: PageRules, tables, max_new: int) -> set[tuple[int, ...]]:
    """Every token sequence the grammar's mask lets through (depth-first over the allowed tokens); asserts
    that every path ends in EOS (no dead end)."""
    rules = grammar.prepare(rules, tables)
    allowed = jax.jit(lambda state: grammar.allowed(state, rules, tables))
    advance = jax.jit(lambda state, token: grammar.advance(state, token, rules, tables))
    out, stack = set(), [((), grammar.init(rules, tables, max_new))]
    while stack:
        prefix, state = stack.pop()
        tokens = np.flatnonzero(np.asarray(allowed(state))[0])
        assert len(tokens), f"dead end after {prefix}"
        for token in tokens:
            seq = prefix + (int(token),)
            if token == EOS:
                out.add(seq)
            else:
                stack.append((seq, advance(state, jnp.array([token]))))
    return out


def valid_pages(grammar: PageGrammar, items: SemanticItems, eligible: np.ndarray, excluded: set, allowed: np.ndarray,
                min_items: int, max_items: int, max_shelves: int) -> set[tuple[int, ...]]:
    """Every valid page as tokens, by enumerating pages and checking the rules directly: distinct allowed
    shelves, min..max distinct eligible non-excluded items each, and no shorter page while another shelf
    could still be filled."""
    n = items.num_items
    usable = [k for k in range(n) if k not in excluded]
    shelf_fills = {s: [seq for size in range(min_items, max_items + 1)
                       for seq in itertools.permutations([k for k in usable if eligible[s, k]], size)]
                   for s in range(grammar.num_shelves) if allowed[s]}
    out = set()
    for count in range(1, max_shelves + 1):
        for order in itertools.permutations(shelf_fills, count):
            for fills in itertools.product(*(shelf_fills[s] for s in order)):
                placed = [k for fill in fills for k in fill]
                if len(set(placed)) != len(placed):
                    continue
                if count < max_shelves and any(
                        s not in order and sum(1 for k in usable if eligible[s, k] and k not in placed) >= min_items
                        for s in shelf_fills):
                    continue
                tokens = []
                for s, fill in zip(order, fills):
                    tokens.append(grammar.shelf_offset + s)
                    for k in fill:
                        tokens += [grammar.item_offset + c for c in items.encode(items.item_ids[k])]
                out.add(tuple(tokens) + (EOS,))
    return out


def test_trie_constrained_grammar_accepts_exactly_the_valid_pages():
    """Random tiny catalogs (code tuples of 2 or 3 levels, some prefixes shared, some codes unused),
    eligibility with history-dependent extra pairs, exclusions and shelf allow-lists: the pages the mask
    allows are exactly the brute-force valid pages, and no allowed path dead-ends (a prefix whose items
    are all ineligible or used is never entered)."""
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(12):
        levels = 2 + trial % 2
        sizes = rng.integers(2, 4, levels)
        all_tuples = np.array(list(itertools.product(*(range(s) for s in sizes))), np.int32)
        codes = all_tuples[rng.choice(len(all_tuples), int(rng.integers(4, 6)), replace=False)]
        grammar, items = semantic_grammar(codes, shelves=2)
        n = items.num_items
        static = rng.random((2, n)) < 0.6
        extra = [(s, k) for s in range(2) for k in range(n) if not static[s, k] and rng.random() < 0.3]
        excluded = set(rng.choice(n, int(rng.integers(0, 2)), replace=False).tolist())
        eligible = static.copy()
        for s, k in extra:
            eligible[s, k] = True
        allowed = np.array([True, rng.random() < 0.8])
        min_items, max_items = int(rng.integers(1, 3)), 2
        rules = page_rules(2, extra, excluded, allowed, min_items, max_items)
        expected = valid_pages(grammar, items, eligible, excluded, allowed, min_items, max_items, 2)
        if not expected:
            continue
        tables = grammar.tables(static, items.code_table())
        assert accepted_pages(grammar, rules, tables, grammar.max_length(2, max_items)) == expected, trial
        checked += 1
    assert checked >= 8


def _model(vocab_size: int, seed: int, value_head: bool = False):
    cfg = TransformerConfig(vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, mlp_dim=64, value_head=value_head)
    model = Transformer(cfg, nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    return model, graphdef, nnx.to_pure_dict(state)


def test_beam_search_finds_the_brute_force_best_semantic_page():
    """Four items of two codes each, one item per shelf, two shelves: the beam (as wide as the number of
    prefixes) returns the page of highest length-normalised log-probability, scored by a full forward pass."""
    grammar, items = semantic_grammar(np.array([[0, 0], [0, 1], [1, 0], [2, 1]]), shelves=2)
    tables = grammar.tables(np.ones((2, 4), bool), items.code_table())
    rules = page_rules(2, max_items=1)
    pages = valid_pages(grammar, items, np.ones((2, 4), bool), set(), np.ones(2, bool), 1, 1, 2)
    assert len(pages) == 24
    prompt = [1, 3, 4]
    for seed in range(3):
        model, graphdef, params = _model(grammar.vocab_size, seed)

        @jax.jit
        def logps(tokens):
            logits, _ = model(tokens, jnp.arange(tokens.shape[1])[None], jnp.ones_like(tokens))
            return jax.nn.log_softmax(logits[0], axis=-1)

        def score(page):
            lp = logps(jnp.asarray([prompt + list(page)]))
            total = sum(float(lp[len(prompt) - 1 + t, token]) for t, token in enumerate(page))
            return total / float(length_penalty(len(page), 0.6))

        scores = {page: score(page) for page in pages}
        best = max(scores, key=scores.get)
        out = beam_search(graphdef, params, jnp.asarray([prompt]), jnp.asarray([3]), rules, tables, grammar=grammar,
                          beam_size=32, max_new=grammar.max_length(2, 1))
        found = tuple(int(t) for t in np.asarray(out.tokens[0, 0]) if t != PAD)
        assert found == best
        np.testing.assert_allclose(float(out.scores[0, 0]), scores[best], rtol=1e-4)


def _check_page(tokens, grammar: PageGrammar, items: SemanticItems, eligible: np.ndarray, excluded: set,
                allowed: np.ndarray, min_items: int, max_items: int, max_shelves: int) -> None:
    """Decodes a token row and asserts every rule on the item level."""
    tokens = [int(t) for t in tokens if t != PAD]
    assert tokens[-1] == EOS
    shelves, placed, k = [], [], 0
    while tokens[k] != EOS:
        shelf = tokens[k] - grammar.shelf_offset
        assert 0 <= shelf < grammar.num_shelves and allowed[shelf] and shelf not in [s for s, _ in shelves]
        k += 1
        fill = []
        while grammar.item_offset <= tokens[k]:
            item = items.decode([t - grammar.item_offset for t in tokens[k:k + grammar.levels]])
            assert item is not None, "not a code tuple of the catalog"
            row = items.index[item]
            assert eligible[shelf, row] and row not in excluded
            fill.append(row)
            k += grammar.levels
        assert min_items <= len(fill) <= max_items
        shelves.append((shelf, fill))
        placed += fill
    assert len(placed) == len(set(placed)), "an item twice on a page"
    assert 1 <= len(shelves) <= max_shelves


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.integers(0, 2**31 - 1))
def test_multi_token_items_are_never_repeated_or_misplaced(seed):
    """Random catalogs of 60 three-code items, random eligibility (one history-dependent shelf made only of
    extra pairs), exclusions and page shapes: every sampled and beam-searched page keeps every rule."""
    rng = np.random.default_rng(seed)
    n, shelves = 60, 4
    codes = np.stack([rng.integers(0, 4, n), rng.integers(0, 3, n), np.arange(n) % 5], axis=1)
    codes = np.unique(codes, axis=0)
    grammar, items = semantic_grammar(codes, shelves)
    n = items.num_items
    static = rng.random((shelves, n)) < rng.uniform(0.1, 0.6, (shelves, 1))
    static[0] = False
    extra = [(0, int(k)) for k in rng.choice(n, 12, replace=False)]
    excluded = set(rng.choice(n, 5, replace=False).tolist())
    eligible = static.copy()
    for s, k in extra:
        eligible[s, k] = True
    allowed = rng.random(shelves) < 0.8
    allowed[int(rng.integers(shelves))] = True
    min_items, max_items, max_shelves = 2, int(rng.integers(2, 5)), int(rng.integers(1, 4))
    available = [(eligible[s] & ~np.isin(np.arange(n), list(excluded))).sum() >= min_items for s in range(shelves)]
    if not any(a and b for a, b in zip(available, allowed)):
        return
    rows = 3
    rules = page_rules(shelves, extra, excluded, allowed, min_items, max_items, max_shelves, rows=rows)
    tables = grammar.tables(static, items.code_table())
    _, graphdef, params = _model(grammar.vocab_size, seed % 3)
    prompts, lengths = jnp.asarray([[1, 3, 4]] * rows), jnp.asarray([3] * rows)
    max_new = grammar.max_length(max_shelves, max_items)
    sampled = sample(graphdef, params, prompts, lengths, rules, tables, jnp.arange(rows) + seed % 1000,
                     jnp.full((rows,), 2.0), jnp.zeros((rows,), jnp.int32), jnp.ones((rows,)), grammar=grammar,
                     max_new=max_new)
    beams = beam_search(graphdef, params, prompts[:1], lengths[:1], rules.take(jnp.array([0])), tables,
                        grammar=grammar, beam_size=3, max_new=max_new)
    assert bool(np.all(sampled.valid)) and bool(np.all(beams.valid))
    for row in list(np.asarray(sampled.tokens[:, 0])) + list(np.asarray(beams.tokens[0])):
        _check_page(row, grammar, items, eligible, excluded, allowed, min_items, max_items, max_shelves)


@pytest.fixture(scope="module")
def semantic_engine(tiny_semantic_checkpoint):
    return PageEngine(tiny_semantic_checkpoint)


def test_semantic_checkpoint_pages_are_valid_in_every_mode(semantic_engine, tiny_semantic_checkpoint):
    """Beam search under both objectives and sampling on a semantic checkpoint: full valid pages, multi-token
    items decoded to catalog items, and each beam page's log-probability (summed over its code tokens)
    equal to its teacher-forced score (sampling reports log-probabilities renormalised over the allowed
    tokens instead)."""
    engine = semantic_engine
    assert engine.vocab.items.tokens_per_item == 3 and engine.objective == "streams"
    validator = PageValidator(engine.vocab, engine.eligibility_spec)
    history = engine.vocab.items.item_ids[20:30]
    base = {"user_id": "u3", "history": history, "num_shelves": 4, "min_items_per_shelf": 5,
            "max_items_per_shelf": 5, "exclude_items": engine.vocab.items.item_ids[:40:2]}
    requests = [parse_request({**base, "beam_size": 3}), parse_request({**base, "temperature": 1.0, "seed": 4})]
    responses = engine.generate(requests) + engine.generate(requests[:1], objective="likelihood")
    for request, response in zip(requests + requests[:1], responses):
        assert "error" not in response, response
        assert_valid(validator, request, response)
        assert sum(len(s["items"]) for s in response["page"]) == 4 * 5
    scored = engine.score(requests + requests[:1], [r["page"] for r in responses])
    for response, forced in zip(responses[::2], scored[::2]):
        assert forced["log_prob"] == pytest.approx(response["log_prob"], abs=2e-3)
        assert [{k: s[k] for k in ("shelf", "items", "item_scores")} for s in forced["page"]] == \
                [{k: s[k] for k in ("shelf", "items", "item_scores")} for s in response["page"]]
    assert responses[0]["predicted_streams"] == pytest.approx(scored[0]["predicted_streams"], abs=2e-3)
    # Item-level search (every beam keeps 3 hypotheses inside an item): valid, and scored as it claims.
    wide = PageEngine(tiny_semantic_checkpoint, item_width=3)
    response = wide.generate(requests[:1])[0]
    assert_valid(validator, requests[0], response)
    assert engine.score(requests[:1], [response["page"]])[0]["predicted_streams"] == pytest.approx(
        response["predicted_streams"], abs=2e-3)


def test_semantic_pages_keep_every_rule_under_random_requests(semantic_engine):
    validator = PageValidator(semantic_engine.vocab, semantic_engine.eligibility_spec)

    @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(request_strategy(semantic_engine, familiarities=(0.0,)))
    def check(requests):
        for request, response in zip(requests, semantic_engine.generate(requests)):
            if "error" in response:  # only when the constraints leave no shelf that can be filled
                assert "eligible items left" in response["error"], response
                continue
            assert_valid(validator, request, response)

    check()


def test_page_table_of_a_semantic_checkpoint(tiny_semantic_checkpoint):
    """scripts/evaluate.py's page table on a semantic checkpoint: homegen's rows are valid full pages
    (the pointwise baseline needs one token per item and is left out)."""
    result = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", tiny_semantic_checkpoint,
                             "--max_users", "6"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(tiny_semantic_checkpoint, "eval", "results.json")) as f:
        pages = json.load(f)["pages"]
    assert "pointwise (same model)" not in pages
    for name in ("homegen beam search (streams)", "homegen beam search (likelihood)", "homegen sampling"):
        assert pages[name]["valid_rate"] == 1.0 and pages[name]["items_per_page"] == 60
        assert 0 < pages[name]["expected_streams"] < pages["oracle"]["expected_streams"]


def _post(url: str, path: str, obj, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", json.dumps(obj).encode(), method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_catalog_refresh_places_new_releases_without_retraining(tiny_semantic_checkpoint, tiny_checkpoint,
                                                                tfds_dir, tmp_path):
    """The checkpoint was trained without the world's newest releases. A request that only new items can
    fill fails before the refresh; after POST /v1/catalog naming the world's catalog in the server's catalog
    directory they get semantic IDs from their metadata (same token layout, same model) and fill the
    "new_releases" shelf, every rule kept. An atomic checkpoint cannot add them, and a bad catalog is a 400
    naming the file and line without quoting it."""
    world_catalog = os.path.join(SyntheticWorldDataset(config="tiny", data_dir=tfds_dir).world_dir(), "catalog.jsonl")
    catalogs = tmp_path / "catalogs"
    catalogs.mkdir()
    (catalogs / "catalog.jsonl").write_bytes(open(world_catalog, "rb").read())
    engine = PageEngine(tiny_semantic_checkpoint)
    with open(world_catalog) as f:
        world_items = [json.loads(line)["item_id"] for line in f]
    new = [item for item in world_items if item not in engine.vocab.items.index]
    assert 4 <= len(new) <= 40, len(new)
    vocab_size = engine.vocab.size
    obj = {"user_id": "u1", "num_shelves": 1, "allowed_shelves": ["new_releases"], "min_items_per_shelf": 4,
           "max_items_per_shelf": 4, "beam_size": 2, "exclude_items": list(engine.vocab.items.item_ids)}
    request = parse_request(obj)
    assert "eligible items left" in engine.generate([request])[0]["error"]

    admin = {"Authorization": "Bearer s3cret"}
    with running_server(engine, ServerSettings(admin_token="s3cret", catalog_dir=str(catalogs))) as (url, _):
        code, body = _post(url, "/v1/catalog", {"catalog": "missing.jsonl"}, admin)
        assert code == 400 and "no such catalog file" in body["error"]
        (catalogs / "bad.jsonl").write_text('{"item_id": "x1"}\n{"title": "SECRET-TITLE"}\n')
        code, body = _post(url, "/v1/catalog", {"catalog": "bad.jsonl"}, admin)
        assert code == 400 and "bad.jsonl" in body["error"] and "line 2" in body["error"], body
        assert "SECRET" not in body["error"]
        code, body = _post(url, "/v1/catalog", {"catalog": "catalog.jsonl"}, admin)
        assert code == 200 and body["added"] == len(new) and body["placeable"] >= 4, body
        assert _post(url, "/v1/catalog", {"catalog": "catalog.jsonl"}, admin)[1]["added"] == 0
        code, response = _post(url, "/v1/pages", obj)
    assert code == 200, response
    assert engine.vocab.size == vocab_size and set(new) <= set(engine.vocab.items.item_ids)
    assert_valid(PageValidator(engine.vocab, engine.eligibility_spec), request, response)
    assert set(response["page"][0]["items"]) <= set(new)

    atomic = PageEngine(tiny_checkpoint)
    (tmp_path / "one_new.jsonl").write_text('{"item_id": "brand_new", "title": "Fresh", "artist": "Someone"}\n')
    with pytest.raises(ValueError, match="atomic"):
        atomic.refresh_catalog(str(tmp_path / "one_new.jsonl"))


def test_semantic_ids_quantise_a_trained_atomic_runs_item_embeddings(tiny_checkpoint, tiny_semantic_checkpoint,
                                                                       tfds_dir):
    """data.semantic_from: the vocabulary's codes come from the atomic run's item embeddings at its selected
    step, so items sharing a first code are closer in that run's embedding space than items that do not."""
    from homegen.configs.demo import get_config
    from homegen.data.vocab import Vocabulary
    from homegen.training.data import build_vocabulary, prepare_data
    from homegen.training.item_embeddings import trained_item_embeddings

    atomic = Vocabulary.load(os.path.join(tiny_checkpoint, "vocab"))
    ids = atomic.items.item_ids
    embeddings, source = trained_item_embeddings(tiny_checkpoint, ids)
    table = params_of(tiny_checkpoint)["embed"]
    np.testing.assert_array_equal(embeddings, table[[atomic.item_tokens(i)[0] for i in ids]])
    assert source.endswith(f"step {TINY_STEPS} (best validation_loss on validation)")

    cfg = get_config()
    cfg.data.update(dict(data_dir=tfds_dir, source="synthetic", item_tokens="semantic", semantic_levels=2,
                         semantic_codes=8, semantic_from=tiny_checkpoint))
    vocab, _, _ = build_vocabulary(cfg.data, prepare_data(cfg.data, tfds_dir, True, lambda name: None))
    assert isinstance(vocab.items, SemanticItems) and vocab.items.level_sizes[:2] == [8, 8]
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    first = np.array([vocab.items.encode(i)[0] for i in ids])
    cosine, same = unit @ unit.T, first[:, None] == first[None]
    off_diagonal = ~np.eye(len(ids), dtype=bool)
    assert cosine[same & off_diagonal].mean() > cosine[~same].mean() + 0.05  # 0.09 against -0.01 when written

    with pytest.raises(ValueError, match="item embeddings come from a run with atomic item tokens"):
        trained_item_embeddings(tiny_semantic_checkpoint, ids)
    with pytest.raises(ValueError, match="1 of .* items have no token"):
        trained_item_embeddings(tiny_checkpoint, ids + ["not-an-item"])

"""Semantic IDs for catalogs of any size: the streaming catalog reader, the bounded fit set, and codes equal
to the in-memory builder's where the fit set is the whole catalog."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import ROOT

from homegen.data.formats import DataFormatError, iter_page_logs, read_catalog
from homegen.data.semantic_catalog import (
    build_catalog_codes,
    build_semantic_items,
    read_catalog_columns,
    spread_full_prefixes,
)
from homegen.data.semantic_ids import (
    SemanticItems,
    binary_rows,
    catalog_attributes,
    cooccurrence_features,
    idf_weights,
    item_attributes,
    nearest_codes,
    residual_quantize,
    truncated_svd_embeddings,
    with_collision_code,
)


def _sequences(world_dir: str) -> list[list[str]]:
    return [log.history + [i for s in log.page for i in s.items]
            for log in iter_page_logs(os.path.join(world_dir, "pages.jsonl"))]


def _pieces(title: str) -> list[str]:
    return title.split()


def test_columns_hold_every_item_and_its_attributes_in_file_order(tiny_world_dir):
    path = os.path.join(tiny_world_dir, "catalog.jsonl")
    catalog = read_catalog(path)
    columns = read_catalog_columns(path, _pieces, chunk=128)  # several chunks
    assert [i.decode() for i in columns.item_ids.tolist()] == list(catalog)
    assert columns.lines.tolist() == list(range(1, len(catalog) + 1))
    for row in (0, 127, 128, 599):
        values = columns.attribute_ids[columns.offsets[row]:columns.offsets[row + 1]]
        assert [columns.values[v] for v in values] == item_attributes(catalog[f"t{row}"], _pieces)
    rows = columns.rows_of(["t5", "nope", "t599", "t0"])
    assert rows.tolist() == [5, -1, 599, 0]


def test_selected_items_keep_their_attributes_and_unknown_items_have_none(tiny_world_dir):
    columns = read_catalog_columns(os.path.join(tiny_world_dir, "catalog.jsonl"), _pieces)
    chosen = columns.select(["t599", "new", "t0", "t5"])
    assert chosen.item_ids.tolist() == [b"t599", b"new", b"t0", b"t5"] and chosen.lines.tolist() == [600, 0, 1, 6]
    assert chosen.rows_of(["t0", "new", "t6"]).tolist() == [2, 1, -1]
    expected = columns.attribute_matrix(np.array([599, 0, 5]), np.arange(len(columns.values))).toarray()
    got = chosen.attribute_matrix(np.arange(4), np.arange(len(columns.values))).toarray()
    np.testing.assert_array_equal(got[[0, 2, 3]], expected)
    assert got[1].sum() == 0


def test_bad_catalogs_name_the_line(tmp_path):
    path = tmp_path / "catalog.jsonl"
    path.write_text('{"item_id": "a"}\n\n{"item_id": "b"}\n{"item_id": "a", "genres": ["x"]}\n')
    with pytest.raises(DataFormatError, match=r"catalog.jsonl:4: duplicate item_id 'a' \(first on line 1\)"):
        read_catalog_columns(str(path))
    path.write_text('{"item_id": "a"}\n{"item_id": "b", "genres": "rock"}\n')
    with pytest.raises(DataFormatError, match=r"catalog.jsonl:2: 'genres' must be a list of strings"):
        read_catalog_columns(str(path))


def _whole_catalog_reference(item_ids, sequences, attributes, levels, codes, dim):
    """The algorithm on the whole catalog, written out: SVD of [co-occurrence PMI | IDF-weighted attributes],
    residual k-means, full tuples spilled (tested above), collision codes."""
    index = {item: k for k, item in enumerate(item_ids)}
    cooccurrence = cooccurrence_features([[index[i] for i in s] for s in sequences], len(item_ids))
    names = {}
    rows, cols = [], []
    for item in item_ids:
        for value in attributes[item]:
            rows.append(index[item])
            cols.append(names.setdefault(value, len(names)))
    matrix = binary_rows(rows, cols, (len(item_ids), len(names)))
    features = sp.hstack([cooccurrence, matrix @ sp.diags(idf_weights(matrix))]).tocsr()
    embeddings, _ = truncated_svd_embeddings(features, dim)
    prefixes, centroids = residual_quantize(embeddings, levels, codes)
    spread_full_prefixes(prefixes, lambda rows: embeddings[rows], centroids, codes)
    return with_collision_code(prefixes)


def test_codes_fitted_on_the_whole_catalog_are_the_whole_catalog_algorithms(tiny_world_dir):
    path = os.path.join(tiny_world_dir, "catalog.jsonl")
    catalog = read_catalog(path)
    sequences = _sequences(tiny_world_dir)
    built = build_catalog_codes(read_catalog_columns(path, _pieces), sequences, fit_items=10**6, levels=2,
                                codes=16, dim=16)
    attributes = catalog_attributes(catalog, _pieces)
    np.testing.assert_array_equal(built.codes, _whole_catalog_reference(list(catalog), sequences, attributes, 2, 16, 16))
    assert len(built.fit_rows) == len(catalog)
    # Items held in memory give the same tokenizer as the file read streaming.
    in_memory = build_semantic_items(list(catalog), sequences, attributes, levels=2, codes=16, dim=16)
    np.testing.assert_array_equal(in_memory.codes, SemanticItems(list(catalog), built.codes).codes)
    assert in_memory.encoder.attributes == built.encoder.attributes


def test_a_bounded_fit_set_takes_the_most_logged_items_and_codes_the_rest_from_metadata(tiny_world_dir):
    path = os.path.join(tiny_world_dir, "catalog.jsonl")
    catalog = read_catalog(path)
    columns = read_catalog_columns(path, _pieces)
    sequences = _sequences(tiny_world_dir)[:40]
    counts = {}
    for s in sequences:
        for i in s:
            counts[i] = counts.get(i, 0) + 1
    built = build_catalog_codes(columns, sequences, fit_items=100, levels=2, codes=16, dim=8, chunk=64)
    assert len(built.fit_rows) == 100 and len(np.unique(built.fit_rows)) == 100
    fitted = {f"t{r}" for r in built.fit_rows}
    least_fitted = min(counts[i] for i in fitted)
    assert all(count <= least_fitted for item, count in counts.items() if item not in fitted)
    # No two items share a tuple, no tuple is held by more than 16 items (the collision code's range), and
    # the rest's codes are what the encoder gives from metadata: the first level exactly, the last unless
    # the item spilled out of a full tuple.
    assert len({tuple(r) for r in built.codes.tolist()}) == len(catalog) and built.codes[:, -1].max() < 16
    rest = np.setdiff1d(np.arange(len(catalog)), built.fit_rows)
    expected = nearest_codes(built.encoder.embed([item_attributes(catalog[f"t{r}"], _pieces) for r in rest]),
                             list(built.encoder.centroids))
    np.testing.assert_array_equal(built.codes[rest, 0], expected[:, 0])
    assert 0.5 < (built.codes[rest, 1] == expected[:, 1]).mean() < 1.0
    # Every item's tuple decodes back to it through the tokenizer.
    items = SemanticItems(list(catalog), built.codes, built.encoder)
    assert all(items.decode(items.encode(i)) == i for i in list(catalog)[::37])


def test_the_benchmark_prints_phases_and_checks_the_codes(tiny_world_dir):
    result = subprocess.run([sys.executable, "scripts/benchmark_semantic_ids.py",
                             "--catalog", os.path.join(tiny_world_dir, "catalog.jsonl"),
                             "--pages", os.path.join(tiny_world_dir, "pages.jsonl"), "--max_pages", "500",
                             "--fit_items", "300", "--codes", "16", "--dim", "16", "--sentencepiece_items", "600"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "300 more items coded from their metadata" in result.stdout
    assert "600 items, 600 distinct code tuples" in result.stdout
    table = {line[:28].strip(): line[28:].split() for line in result.stdout.splitlines()
             if line.startswith(("fit set ", "coded from metadata", "most common genre alone"))}
    assert table["fit set"][1:] == ["(300", "items)"] and table["coded from metadata"][1:] == ["(300", "items)"]
    # Codes learned from co-occurrence and metadata group items by genre better than one genre for all.
    assert float(table["fit set"][0]) > float(table["most common genre alone"][0])


def test_full_code_tuples_spill_to_the_next_nearest_code_with_room():
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((2, 4, 3)).astype(np.float32)
    centroids[0] *= 10  # first-level clusters far apart, second-level refinements small
    embeddings = np.tile(centroids[0, 1] + centroids[1, 2], (10, 1))  # 10 alike items
    embeddings[9] = centroids[0, 0] + centroids[1, 3]  # and one elsewhere
    prefixes = nearest_codes(embeddings, list(centroids))
    assert (prefixes[:9] == [1, 2]).all()
    before = prefixes.copy()
    moved, over = spread_full_prefixes(prefixes, lambda rows: embeddings[rows], centroids, capacity=3)
    assert (moved, over) == (6, 0)
    np.testing.assert_array_equal(prefixes[:, 0], before[:, 0])  # only the last code moves
    np.testing.assert_array_equal(prefixes[:3], before[:3]) and np.testing.assert_array_equal(prefixes[9], before[9])
    tuples, counts = np.unique(prefixes[:9], axis=0, return_counts=True)
    assert counts.max() == 3 and len(tuples) == 3
    # The spilled items took the codes nearest to them, in order of distance.
    distance = ((embeddings[0] - centroids[0, 1] - centroids[1]) ** 2).sum(1)
    assert sorted(tuples[:, 1].tolist()) == sorted(np.argsort(distance)[:3].tolist())
    # A shorter prefix with no room left keeps the rest over capacity, and says how many.
    crowded = np.tile([[1, 2]], (14, 1)).astype(np.int32)
    assert spread_full_prefixes(crowded, lambda rows: embeddings[np.zeros(len(rows), int)], centroids, 3) == (9, 2)
    assert sorted(np.unique(crowded, axis=0, return_counts=True)[1].tolist()) == [3, 3, 3, 5]
    # Ranking two choices at a time gives the same placement.
    again = np.tile([[1, 2]], (14, 1)).astype(np.int32)
    assert spread_full_prefixes(again, lambda rows: embeddings[np.zeros(len(rows), int)], centroids, 3, window=2) \
        == (9, 2)
    np.testing.assert_array_equal(again, crowded)

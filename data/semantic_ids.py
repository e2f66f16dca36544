"""Semantic item IDs: each item becomes a short tuple of codes, learned by residual k-means over item
embeddings (the RQ-KMeans variant of TIGER's RQ-VAE), plus a last code that tells apart items whose
tuples collide. Similar items share code prefixes, so a model can generalise across them and a catalog
costs `levels x codes` tokens instead of one per item.

This module holds the tokenizer (`SemanticItems`), the encoder of items added later, and the building
blocks: co-occurrence PMI, IDF-weighted attributes, randomised SVD, k-means, residual codes. How they are
put together for a catalog of any size is `data/semantic_catalog.py`.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from homegen.data.formats import CatalogItem


class SemanticItems:
    """Items as tuples of codes; code c at level l is local token `level_offsets[l] + c`."""

    def __init__(self, item_ids: Sequence[str], codes: np.ndarray, encoder: NewItemEncoder | None = None):
        self.encoder = encoder  # codes items first seen after training, from their attributes
        codes = np.asarray(codes, np.int32)
        if codes.ndim != 2 or len(codes) != len(item_ids):
            raise ValueError(f"codes must be (items, levels), got {codes.shape} for {len(item_ids)} items")
        # Rows in code-tuple order: every node of the trie of tuples is then a contiguous range of rows,
        # which is how constrained page decoding walks it (model/grammar.py).
        keys = packed_keys(codes)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        if (np.diff(self._keys) == 0).any():
            raise ValueError("two items share a code tuple")
        self.item_ids = [item_ids[k] for k in order]
        self.codes = codes[order]
        self.num_items = len(self.item_ids)
        self.index = {item: k for k, item in enumerate(self.item_ids)}
        if len(self.index) != self.num_items:
            raise ValueError("an item id appears twice")
        self.tokens_per_item = self.codes.shape[1]
        self.level_sizes = [int(s) for s in self.codes.max(axis=0) + 1] if len(self.codes) else [1] * self.tokens_per_item
        self.level_offsets = [int(o) for o in np.cumsum([0] + self.level_sizes[:-1])]
        self.num_tokens = int(sum(self.level_sizes))

    def encode(self, item_id: str) -> tuple[int, ...] | None:
        row = self.index.get(item_id)
        if row is None:
            return None
        return tuple(int(c) + o for c, o in zip(self.codes[row], self.level_offsets))

    def decode(self, codes: Sequence[int]) -> str | None:
        # The rows are in code-tuple order, so their packed keys (`_keys`) are sorted: a bisection finds one.
        if len(codes) != self.tokens_per_item:
            return None
        key = 0
        for c, offset, size in zip(codes, self.level_offsets, self.level_sizes):
            if not offset <= int(c) < offset + size:
                return None
            key = key * size + int(c) - offset
        row = int(np.searchsorted(self._keys, key))
        return self.item_ids[row] if row < self.num_items and self._keys[row] == key else None

    def code_table(self) -> np.ndarray:
        return self.codes

    def add(self, item_ids: Sequence[str], attributes: Sequence[Sequence[str]]) -> SemanticItems:
        """These items plus new ones, coded from their attributes (`catalog_attributes` values) by the
        encoder kept from training, within the existing level sizes: the token layout, and so the model,
        stays as it is. Items already known are left as they are."""
        if self.encoder is None:
            raise ValueError("these semantic IDs were built without item metadata, so they cannot code new items")
        fresh = [(i, a) for i, a in zip(item_ids, attributes) if i not in self.index]
        if not fresh:
            return self
        new_codes = self.encoder.codes([a for _, a in fresh], self.codes, self.level_sizes)
        return SemanticItems(self.item_ids + [i for i, _ in fresh], np.concatenate([self.codes, new_codes]),
                             self.encoder)

    def to_json(self) -> dict:
        out = {"kind": "semantic", "item_ids": self.item_ids, "codes": _array_to_json(self.codes, "int32")}
        if self.encoder is not None:
            out["encoder"] = self.encoder.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict) -> SemanticItems:
        encoder = NewItemEncoder.from_json(data["encoder"]) if data.get("encoder") else None
        codes = data["codes"]  # base64 int32 (older checkpoints: a list of lists)
        return cls(data["item_ids"], _array_from_json(codes) if isinstance(codes, dict) else np.asarray(codes, np.int32),
                   encoder)


def _array_to_json(x: np.ndarray, dtype: str = "float32") -> dict:
    """An array as {"shape", dtype: base64 of its bytes}: compact, and quick to read back at 10^7 rows."""
    return {"shape": list(x.shape), dtype: base64.b64encode(np.ascontiguousarray(x, dtype)).decode("ascii")}


def _array_from_json(data: dict) -> np.ndarray:
    dtype = "int32" if "int32" in data else "float32"
    return np.frombuffer(base64.b64decode(data[dtype]), dtype).reshape(data["shape"]).copy()


@dataclasses.dataclass
class NewItemEncoder:
    """Codes for items first seen after training, from their attributes alone: IDF-weighted as the training
    items' were, embedded by the attribute rows of the training SVD projection, quantised by the training
    centroids, and given the first collision code still free under that prefix (or, when the prefix is
    full, the nearest prefix with a free one)."""

    attributes: list[str]  # attribute values, one per column
    idf: np.ndarray  # (A,)
    projection: np.ndarray  # (A, dim)
    centroids: np.ndarray  # (levels, codes, dim)

    def embed(self, attributes: Sequence[Sequence[str]]) -> np.ndarray:
        """(items, dim) unit-length embeddings (zero for items with no known attribute)."""
        column = {a: k for k, a in enumerate(self.attributes)}
        rows, cols = [], []
        for row, attrs in enumerate(attributes):
            for a in attrs:
                if a in column:
                    rows.append(row)
                    cols.append(column[a])
        return self.embed_columns(binary_rows(rows, cols, (len(attributes), len(self.attributes))))

    def embed_columns(self, features: sp.csr_matrix) -> np.ndarray:
        """`embed` of items given as a binary (items, attribute columns) matrix."""
        emb = np.asarray(features @ sp.diags(self.idf) @ self.projection, np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, 1e-12)

    def codes(self, attributes: Sequence[Sequence[str]], existing: np.ndarray, level_sizes: Sequence[int]) -> np.ndarray:
        """(items, levels + 1) codes of new items, distinct from the `existing` code tuples and from each
        other, every code within `level_sizes`."""
        levels = self.centroids.shape[0]
        centroids = [self.centroids[level, :level_sizes[level]] for level in range(levels)]
        prefixes = nearest_codes(self.embed(attributes), centroids)
        taken: dict[tuple, set] = {}
        for row in existing:
            taken.setdefault(tuple(row[:-1].tolist()), set()).add(int(row[-1]))
        slots = level_sizes[-1]
        out = np.zeros((len(prefixes), levels + 1), np.int32)
        for k, prefix in enumerate(map(tuple, prefixes.tolist())):
            if len(taken.get(prefix, ())) >= slots:
                prefix = self._nearest_open_prefix(prefix, taken, slots)
            used = taken.setdefault(prefix, set())
            code = next(c for c in range(slots) if c not in used)
            used.add(code)
            out[k] = (*prefix, code)
        return out

    def _nearest_open_prefix(self, prefix: tuple, taken: dict[tuple, set], slots: int) -> tuple:
        """The prefix with a free collision code whose centroid sum is nearest to `prefix`'s."""
        open_prefixes = np.array([p for p, used in taken.items() if len(used) < slots], np.int64)
        if not len(open_prefixes):
            raise ValueError("every code tuple of the vocabulary is taken: no room for new items")
        levels = np.arange(self.centroids.shape[0])
        target = self.centroids[levels, np.array(prefix)].sum(0)
        sums = self.centroids[levels[None], open_prefixes].sum(1)
        return tuple(int(c) for c in open_prefixes[((sums - target) ** 2).sum(1).argmin()])

    def to_json(self) -> dict:
        return {"attributes": self.attributes, "idf": _array_to_json(self.idf),
                "projection": _array_to_json(self.projection), "centroids": _array_to_json(self.centroids)}

    @classmethod
    def from_json(cls, data: dict) -> NewItemEncoder:
        return cls(list(data["attributes"]), _array_from_json(data["idf"]), _array_from_json(data["projection"]),
                   _array_from_json(data["centroids"]))


def cooccurrence_features(sequences: Iterable[Sequence[int]], num_items: int, window: int = 3,
                          chunk: int = 20_000) -> sp.csr_matrix:
    """Positive PMI of item pairs that occur within `window` steps of each other in a sequence. Pairs are
    counted `chunk` sequences at a time, so memory follows the distinct pairs, not every occurrence."""
    counts = sp.csr_matrix((num_items, num_items), dtype=np.float32)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []

    def flush():
        nonlocal counts, rows, cols
        if rows:
            r, c = np.concatenate(rows), np.concatenate(cols)
            counts = counts + sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(num_items, num_items))
        rows, cols = [], []

    for k, seq in enumerate(sequences):
        seq = np.asarray(seq, np.int64)
        for d in range(1, window + 1):
            if len(seq) > d:
                rows += [seq[:-d], seq[d:]]
                cols += [seq[d:], seq[:-d]]
        if (k + 1) % chunk == 0:
            flush()
    flush()
    counts.sum_duplicates()
    if counts.nnz == 0:
        return counts
    total = counts.sum()
    row_sum = np.asarray(counts.sum(axis=1)).ravel()
    coo = counts.tocoo()
    pmi = np.log(coo.data * total / (row_sum[coo.row] * row_sum[coo.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep].astype(np.float32), (coo.row[keep], coo.col[keep])), shape=counts.shape)


def idf_weights(matrix: sp.csr_matrix) -> np.ndarray:
    """Inverse document frequency of each column of a binary (items, values) matrix, floored at 0."""
    return np.maximum(np.log(matrix.shape[0] / (1.0 + np.asarray(matrix.sum(axis=0)).ravel())), 0.0
                      ).astype(np.float32)


def binary_rows(rows: Sequence[int], cols: Sequence[int], shape: tuple[int, int]) -> sp.csr_matrix:
    """A CSR matrix with 1 at each (row, col) given, however often it is given."""
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def catalog_attributes(catalog: Mapping[str, CatalogItem], pieces: Callable[[str], list[str]] | None = None
                       ) -> dict[str, list[str]]:
    """Each catalog item's metadata as attribute values for `attribute_features` (`item_attributes`)."""
    return {item_id: item_attributes(item, pieces) for item_id, item in catalog.items()}


def item_attributes(item: CatalogItem, pieces: Callable[[str], list[str]] | None = None) -> list[str]:
    """One item's artist, genres, release month and, with `pieces` (e.g. a sentencepiece model's
    `encode_as_pieces`), the pieces of its title, as attribute values."""
    attrs = [f"genre={g}" for g in item.genres]
    if item.artist:
        attrs.append(f"artist={item.artist}")
    if item.release_date:
        attrs.append(f"released={item.release_date[:7]}")
    if pieces and item.title:
        attrs += [f"piece={p}" for p in pieces(item.title.lower())]
    return attrs


def truncated_svd_embeddings(features: sp.csr_matrix, dim: int, seed: int = 0, power_iterations: int = 4
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `features` reduced to `dim` dimensions (randomised SVD, U sqrt(S)), unit length, and the
    (features, dim) projection P with U sqrt(S) = features @ P, which embeds rows seen later the same way."""
    rng = np.random.default_rng(seed)
    n, m = features.shape
    dim = max(1, min(dim, n, m))
    q = np.linalg.qr(features @ rng.standard_normal((m, dim + 10)).astype(np.float32))[0]
    for _ in range(power_iterations):
        q = np.linalg.qr(features @ (features.T @ q))[0]
    u, s, vt = np.linalg.svd(np.asarray((features.T @ q).T), full_matrices=False)
    emb = (q @ u[:, :dim]) * np.sqrt(s[:dim])
    projection = (vt[:dim].T / np.sqrt(np.maximum(s[:dim], 1e-12))).astype(np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    # Items without any feature get a random direction, so they spread over the codes.
    empty = norms[:, 0] == 0
    emb[empty] = rng.standard_normal((int(empty.sum()), emb.shape[1]))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), projection


def kmeans(x: np.ndarray, k: int, iterations: int = 25, seed: int = 0, points_per_centroid: int = 256
           ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; empty clusters are re-seeded from the worst-fit points.
    Centroids are fitted on at most `points_per_centroid * k` points drawn at random (FAISS's rule: more
    points move them little and cost in proportion), then every point is assigned.
    Returns (centroids (k, d), assignment (n,))."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    sample = x
    if len(x) > points_per_centroid * k:
        sample = x[np.sort(rng.choice(len(x), points_per_centroid * k, replace=False))]
    centroids = _lloyd(sample, k, iterations, rng)
    return centroids, nearest_codes(x, [centroids])[:, 0]


def _lloyd(x: np.ndarray, k: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    n = len(x)
    centroids = np.empty((k, x.shape[1]), x.dtype)
    centroids[0] = x[rng.integers(n)]
    closest = ((x - centroids[0]) ** 2).sum(1)
    for j in range(1, k):
        p = closest / closest.sum() if closest.sum() > 0 else None
        centroids[j] = x[rng.choice(n, p=p)]
        closest = np.minimum(closest, ((x - centroids[j]) ** 2).sum(1))
    sq = (x ** 2).sum(1)
    for _ in range(iterations):
        dist = sq[:, None] - 2 * x @ centroids.T + (centroids ** 2).sum(1)[None]
        assign = dist.argmin(1)
        counts = np.bincount(assign, minlength=k)
        sums = sp.csr_matrix((np.ones(n, x.dtype), (assign, np.arange(n))), shape=(k, n)) @ x
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if (~filled).any():
            worst = np.argsort(-dist[np.arange(n), assign])[:int((~filled).sum())]
            centroids[~filled] = x[worst]
    return centroids


def nearest_codes(x: np.ndarray, centroids: Sequence[np.ndarray], chunk: int = 1 << 16) -> np.ndarray:
    """(n, levels) residual codes of the rows of `x`: at each level the nearest of that level's (codes, d)
    centroids, whose vector is then subtracted. Computed `chunk` rows at a time, so the distance matrix
    stays small for any n."""
    out = np.zeros((len(x), len(centroids)), np.int32)
    norms = [(c ** 2).sum(1) for c in centroids]
    for start in range(0, len(x), chunk):
        residual = np.array(x[start:start + chunk], np.float32)
        for level, (c, c_sq) in enumerate(zip(centroids, norms)):
            code = (c_sq[None] - 2 * residual @ c.T).argmin(1)
            out[start:start + chunk, level] = code
            residual -= c[code]
    return out


def residual_quantize(embeddings: np.ndarray, levels: int, codes: int, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(items, levels) codes from `levels` rounds of k-means on the residuals, and the (levels, codes, dim)
    centroids (levels with fewer items than codes repeat their last centroid)."""
    residual = embeddings.astype(np.float32).copy()
    out = np.zeros((len(embeddings), levels), np.int32)
    all_centroids = np.zeros((levels, codes, embeddings.shape[1]), np.float32)
    for level in range(levels):
        centroids, assign = kmeans(residual, codes, seed=seed + level)
        out[:, level] = assign
        residual -= centroids[assign]
        all_centroids[level] = centroids[np.minimum(np.arange(codes), len(centroids) - 1)]
    return out, all_centroids


def residual_codes(embeddings: np.ndarray, levels: int, codes: int, seed: int = 0) -> np.ndarray:
    """(items, levels + 1) codes: `residual_quantize`'s, then a collision code that numbers the items
    sharing the same first `levels` codes."""
    return with_collision_code(residual_quantize(embeddings, levels, codes, seed)[0])


def with_collision_code(codes: np.ndarray) -> np.ndarray:
    """(items, levels + 1): `codes` plus a last code that numbers the items sharing the same tuple."""
    codes = np.asarray(codes)
    key = packed_keys(codes)
    order = np.argsort(key, kind="stable")
    out = np.zeros((len(codes), codes.shape[1] + 1), np.int32)
    out[:, :-1] = codes
    out[order, -1] = ranks_in_groups(key[order])
    return out


def ranks_in_groups(sorted_keys: np.ndarray) -> np.ndarray:
    """Each entry's position among the equal keys before it (0, 1, ... within each run of a sorted array)."""
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return np.arange(len(sorted_keys)) - np.repeat(starts, np.diff(np.r_[starts, len(sorted_keys)]))


def packed_keys(codes: np.ndarray, radix: Sequence[int] | None = None) -> np.ndarray:
    """One int64 per row of a (rows, levels) code table that orders as the rows do lexicographically:
    the codes as digits of a mixed radix, by default each level's largest code + 1. Built digit by digit,
    so memory is one int64 per row whatever the levels."""
    codes = np.asarray(codes)
    if not codes.size:
        return np.zeros(len(codes), np.int64)
    radix = [int(r) for r in (codes.max(axis=0) + 1 if radix is None else radix)]
    if float(np.prod(np.asarray(radix, np.float64))) >= 2.0 ** 63:
        raise ValueError(f"code tuples with level sizes {radix} do not fit in one int64 key")
    key = codes[:, 0].astype(np.int64)
    for level in range(1, codes.shape[1]):
        key *= radix[level]
        key += codes[:, level]
    return key


def item_trie(code_table: np.ndarray) -> np.ndarray:
    """The trie of valid code tuples, for constrained decoding, as a table `children[node, c]` over the
    inner nodes (node 0 is the root): the inner node that code c leads to, or at the last level the item
    index it completes; -1 where no item continues that way."""
    code_table = np.asarray(code_table, np.int64)
    n, levels = code_table.shape
    nodes = {(): 0}
    edges = []
    for item, row in enumerate(code_table):
        prefix: tuple = ()
        for depth, c in enumerate(row):
            child = prefix + (int(c),)
            if depth == levels - 1:
                edges.append((nodes[prefix], int(c), item))
            elif child not in nodes:
                nodes[child] = len(nodes)
                edges.append((nodes[prefix], int(c), nodes[child]))
            prefix = child
    children = np.full((len(nodes), int(code_table.max()) + 1 if n else 1), -1, np.int32)
    for parent, c, child in edges:
        children[parent, c] = child
    return children

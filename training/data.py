"""Dataset preparation for a run: the TFDS dataset of the configured source and the run's vocabulary.

The leading process builds (array_record files, vocabulary); the others wait at a barrier and read.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from collections import Counter
from collections.abc import Callable

from homegen.data.attributes import catalog_item_attributes
from homegen.data.beam_prepare import skipped_lines
from homegen.data.builders import InteractionDataset, PageLogDataset, SyntheticWorldDataset, page_log_files
from homegen.data.formats import (
    iter_catalog,
    iter_page_logs,
    read_catalog,
    read_interactions,
    read_item_attributes,
    unique_catalog_items,
)
from homegen.data.log_counts import LogCounts, prepared_counts_path
from homegen.data.semantic_catalog import build_semantic_items, read_catalog_columns, semantic_items_of_columns
from homegen.data.semantic_ids import SemanticItems
from homegen.data.simulator.world import EPOCH
from homegen.data.text import load_sentencepiece
from homegen.data.vocab import Vocabulary, VocabularyBuilder
from homegen.training.item_embeddings import trained_item_embeddings

SOURCES = ("synthetic", "page_logs", "interactions")
DATA_FILES = ("page_logs", "interactions")  # the sources read from a user's file, by their config field


def resolve_source(data_cfg) -> str:
    """The data source a config means: inferred from which data file is set (`data.page_logs` or
    `data.interactions`; neither: the synthetic world) unless `data.source` names one. Contradictions
    (two data files, a named source without its file or with another's, a catalog for the synthetic
    world) are errors."""
    given = [name for name in DATA_FILES if getattr(data_cfg, name)]
    if len(given) > 1:
        raise ValueError("both data.page_logs and data.interactions are set: give one data source")
    inferred = given[0] if given else "synthetic"
    source = data_cfg.source
    if source not in ("auto",) + SOURCES:
        raise ValueError(f"data.source must be one of auto, {', '.join(SOURCES)}; got {source!r}")
    if source not in ("auto", inferred):
        if source == "synthetic":
            raise ValueError(f"data.source='synthetic' contradicts data.{inferred}={getattr(data_cfg, inferred)!r}: "
                             f"drop one of them")
        raise ValueError(f"data.source={source!r} needs --config.data.{source}=FILE"
                         + (f", not data.{inferred}" if given else ""))
    if inferred == "synthetic" and data_cfg.catalog:
        raise ValueError(f"data.catalog={data_cfg.catalog!r} is given without page logs or interactions; the "
                         "synthetic world has its own catalog")
    return inferred


DATA_PATHS = ("page_logs", "interactions", "catalog", "item_features", "data_dir", "semantic_from", "world")
DATA_FILES_READ = ("page_logs", "interactions", "catalog", "item_features")  # those that must exist at the start


def absolute_data_paths(data_cfg) -> None:
    """Makes `data_cfg`'s files and folders absolute (a relative one is taken from the current directory), so
    that the config a checkpoint keeps names its data wherever it is later read from (`evaluate.py`,
    `homegen.load`); page-log globs become the files they match. A data file that does not exist is a
    FileNotFoundError naming the flag that sets it."""
    for field in DATA_PATHS:
        if not data_cfg[field]:
            continue
        paths = [os.path.abspath(os.path.expanduser(p)) for p in data_cfg[field].split(",") if p]
        if field == "page_logs":  # globs name their files, sorted, from here on
            try:
                paths = page_log_files(paths)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"data.page_logs: {e} (set --config.data.page_logs=FILES)") from None
        for path in paths:
            if field in DATA_FILES_READ and not os.path.isfile(path):
                raise FileNotFoundError(f"data.{field}: {path} does not exist (set --config.data.{field}=FILE)")
            if field == "world" and not os.path.isfile(os.path.join(path, "world.json")):
                raise FileNotFoundError(f"data.world: {path} holds no world.json (a scripts/simulate.py folder)")
        data_cfg[field] = ",".join(paths)


@dataclasses.dataclass
class PreparedData:
    sources: dict  # split name -> random-access data source
    kind: str  # "pages" or "sequences"
    catalog_path: str | None
    world_dir: str | None  # the synthetic world's files: the synthetic source's, or data.world's
    skipped: dict[str, frozenset[int]] = dataclasses.field(default_factory=dict)  # file -> lines `homegen prepare` skipped
    log_counts: str | None = None  # where `homegen prepare` saved the logs' counts with the dataset (data/log_counts.py)


def page_log_paths(data_cfg) -> list[str]:
    """The files of `data.page_logs`: comma-separated paths or globs (`homegen prepare --logs` takes the same)."""
    return page_log_files([p for p in data_cfg.page_logs.split(",") if p])


def _builder(data_cfg, data_dir: str):
    source = data_cfg.source
    if source == "synthetic":
        return SyntheticWorldDataset(config=data_cfg.preset, data_dir=data_dir, file_format="array_record")
    if source == "page_logs":
        return PageLogDataset.for_files(page_log_paths(data_cfg), data_dir, data_cfg.validation_fraction)
    if source == "interactions":
        return InteractionDataset.for_file(data_cfg.interactions, data_dir, data_cfg.interactions_format)
    raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")


def prepare_data(data_cfg, default_data_dir: str, is_leader: bool, barrier) -> PreparedData:
    """Builds (leader) or opens the dataset of `data_cfg.source` (as `resolve_source` resolved it)."""
    if data_cfg.catalog and not os.path.isfile(data_cfg.catalog):
        raise FileNotFoundError(f"catalog file {data_cfg.catalog} does not exist")
    data_dir = data_cfg.data_dir or default_data_dir
    if is_leader:
        _builder(data_cfg, data_dir).download_and_prepare()
    barrier("dataset_prepared")
    builder = _builder(data_cfg, data_dir)  # opened after the leader wrote it, so it sees every split
    kind = "sequences" if data_cfg.source == "interactions" else "pages"
    world_dir = builder.world_dir() if data_cfg.source == "synthetic" else (data_cfg.get("world") or None)
    catalog = data_cfg.catalog or (os.path.join(world_dir, "catalog.jsonl") if world_dir else None)
    skipped: dict[str, set[int]] = {}
    if data_cfg.source == "page_logs":  # malformed lines a Beam preparation left out of the dataset
        for error in skipped_lines(data_dir, builder.builder_config.name):
            skipped.setdefault(error.path, set()).add(error.line)
    return PreparedData(builder.as_data_source(), kind, catalog, world_dir,
                        {path: frozenset(lines) for path, lines in skipped.items()},
                        prepared_counts_path(builder.data_dir) if data_cfg.source == "page_logs" else None)


def raw_files(data_cfg, prepared: PreparedData) -> list[str]:
    if data_cfg.source == "synthetic":
        return [os.path.join(prepared.world_dir, "pages.jsonl")]
    if data_cfg.source == "page_logs":
        return page_log_paths(data_cfg)
    return [data_cfg.interactions]


def build_vocabulary(data_cfg, prepared: PreparedData) -> tuple[Vocabulary, Counter, dict[str, list[str]]]:
    """Vocabulary, item counts (for samplers) and the items seen on each shelf type (the shelf
    eligibility the logs show), from the run's raw files in one streaming pass. Each phase is printed with
    its time (at 10^7 catalog items they take minutes)."""
    start = time.perf_counter()

    def progress(phase: str) -> None:
        print(f"vocabulary: {phase} ({time.perf_counter() - start:.0f} s)", flush=True)

    builder = VocabularyBuilder(min_context_count=data_cfg.min_context_count)
    if prepared.catalog_path:  # read streaming: a catalog of 10^7 items is never held as objects
        builder.add_catalog(unique_catalog_items(prepared.catalog_path))
        progress(f"catalog of {len(builder.items):,} items read")
    # Item sequences semantic IDs learn co-occurrence from: the training part of each user's sequence, or a
    # logged page's history and items in page order (the first `semantic_max_sequences` pages).
    train_sequences: list[list[str]] = []
    semantic = data_cfg.item_tokens == "semantic"
    if prepared.kind == "sequences":
        counts: Counter = Counter()
        for user in read_interactions(data_cfg.interactions, data_cfg.interactions_format):
            builder.add_sequence(user)
            counts.update(user.items[:-2])
            train_sequences.append(user.items[:-2])
        shelf_items: dict[str, dict[str, None]] = {}
    else:
        log_counts = LogCounts.load(prepared.log_counts) if prepared.log_counts else None
        if log_counts is not None:
            progress(f"log counts of homegen prepare read ({prepared.log_counts})")
        log_counts, train_sequences = read_page_logs(raw_files(data_cfg, prepared), prepared.skipped, log_counts,
                                                     data_cfg.semantic_max_sequences if semantic else 0,
                                                     data_cfg.max_history)
        log_counts.add_to(builder, data_cfg.outcome_conditioning, data_cfg.user_tokens)
        counts, shelf_items = log_counts.item_counts, log_counts.shelf_items
    skipped = sum(map(len, prepared.skipped.values()))
    progress(f"logs read: {len(builder.items):,} items, {len(builder.shelves):,} shelf types"
             + (f"; {skipped:,} malformed lines left out as `homegen prepare` left them out" if skipped else ""))
    for item in held_out_items(data_cfg, prepared):
        builder.items.pop(item, None)
    for shelf in filter(None, (s.strip() for s in data_cfg.hold_out_shelves.split(","))):
        if builder.shelves.pop(shelf, False) is False:
            raise ValueError(f"data.hold_out_shelves names {shelf!r}, which no page of the data has")
        shelf_items.pop(shelf, None)
    sentencepiece_model = builder.sentencepiece(data_cfg.sentencepiece_vocab)
    progress(f"sentencepiece model of {len(builder.text):,} texts")
    items = None
    if semantic:
        items = semantic_items(data_cfg, list(builder.items), train_sequences, prepared.catalog_path,
                               load_sentencepiece(sentencepiece_model), progress)
    vocab = builder.build(data_cfg.max_history, data_cfg.sentencepiece_vocab, items, sentencepiece_model,
                          item_attributes(data_cfg, prepared.catalog_path), data_cfg.max_item_attributes)
    return vocab, counts, {shelf: list(items) for shelf, items in shelf_items.items()}


def read_page_logs(paths: list[str], skipped: dict[str, frozenset[int]], counts: LogCounts | None,
                   max_sequences: int, max_history: int) -> tuple[LogCounts, list[list[str]]]:
    """One pass over the page logs (leaving out the `skipped` lines): their counts, unless `counts` are given
    already, and the first `max_sequences` pages as item sequences (history, then the page's items). With
    `counts` given, the pass stops once it has the sequences."""
    sequences: list[list[str]] = []
    counting = counts is None
    if counting:
        counts = LogCounts()
    elif not max_sequences:
        return counts, sequences
    for path in paths:
        for log in iter_page_logs(path, skipped.get(path, frozenset())):
            if counting:
                counts.add_page(log)
            if len(sequences) < max_sequences:
                sequences.append(log.history[-max_history:] + [item for shelf in log.page for item in shelf.items])
                if not counting and len(sequences) == max_sequences:
                    return counts, sequences
    return counts, sequences


def item_attributes(data_cfg, catalog_path: str | None) -> dict[str, list] | None:
    """With `data.item_attributes`: each item's attributes, from `item_features_path` or else the catalog's
    metadata (artist, genres, release month, extra fields); None without it."""
    if not data_cfg.item_attributes:
        return None
    if data_cfg.item_tokens != "atomic":
        raise ValueError("data.item_attributes is for atomic item tokens (semantic IDs already quantise the "
                         "items' attributes)")
    path = item_features_path(data_cfg)
    if path:
        return read_item_attributes(path)
    if catalog_path:
        return catalog_item_attributes(read_catalog(catalog_path))
    raise ValueError("data.item_attributes needs item attributes: --config.data.item_features=FILE, a "
                     "NAME_item2attributes.json next to the interaction file NAME.txt, or a catalog; or set "
                     "--config.data.item_attributes=False")


def item_features_path(data_cfg) -> str:
    """`data.item_features`, else for interaction data the S3-Rec attributes file next to the sequence file
    (NAME.txt: NAME_item2attributes.json) if there is one, else ""."""
    if data_cfg.item_features or not data_cfg.interactions:
        return data_cfg.item_features
    sibling = os.path.splitext(data_cfg.interactions)[0] + "_item2attributes.json"
    return sibling if os.path.exists(sibling) else ""


def held_out_items(data_cfg, prepared: PreparedData) -> set[str]:
    """The synthetic world's items released in the last `data.hold_out_release_days` days, which the
    vocabulary leaves out as if they were released after training (to measure serving new releases after a
    catalog refresh); training drops them from pages and histories."""
    days = data_cfg.hold_out_release_days
    if not days:
        return set()
    if not prepared.world_dir:
        raise ValueError("data.hold_out_release_days needs the synthetic world (release days are known there)")
    with open(os.path.join(prepared.world_dir, "world.json")) as f:
        cutoff = (EPOCH + datetime.timedelta(days=json.load(f)["now_day"] - days)).isoformat()
    return {item.item_id for _, item in iter_catalog(prepared.catalog_path)
            if item.release_date and item.release_date[:10] > cutoff}


def semantic_items(data_cfg, item_ids: list[str], train_sequences: list[list[str]], catalog_path: str | None,
                   sentencepiece, progress: Callable[[str], None]) -> SemanticItems:
    """Semantic IDs learned from co-occurrence in the training sequences, plus the item features of
    `data.item_features` or the metadata of the catalog file (artist, genres, release month, title pieces;
    read as arrays, `read_catalog_columns`); or, with `data.semantic_from`, the item embeddings of that
    trained atomic run."""
    settings = dict(levels=data_cfg.semantic_levels, codes=data_cfg.semantic_codes, dim=data_cfg.semantic_dim,
                    fit_items=data_cfg.semantic_fit_items, progress=progress)
    features = item_features_path(data_cfg)
    if data_cfg.semantic_from:
        embeddings, source = trained_item_embeddings(data_cfg.semantic_from, item_ids)
        progress(f"item embeddings of {source}")
        return build_semantic_items(item_ids, train_sequences, embeddings=embeddings, **settings)
    if features:
        return build_semantic_items(item_ids, train_sequences, read_item_attributes(features), **settings)
    if catalog_path:
        columns = read_catalog_columns(catalog_path, sentencepiece.encode_as_pieces)
        progress(f"catalog read: {columns.num_items:,} items")
        return semantic_items_of_columns(item_ids, columns.select(item_ids), train_sequences, **settings)
    return build_semantic_items(item_ids, train_sequences, **settings)

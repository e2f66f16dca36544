"""The grain input pipeline: shuffle, tokenize, pack or pad to a fixed length, batch, shard per process.

Each batch is a dict of (batch, seq_len + 1) arrays: `tokens`, `weights` (loss weight of predicting
tokens[t] from tokens[:t]; 0 for context and padding), `outcomes` (the stream outcome of a logged
target item, `data.vocab.NO_OUTCOME` elsewhere), `segment_ids` (0 = padding; packed examples get
1, 2, ...) and `positions` (restart at 0 in each packed example). The iterator's `get_state()` /
`set_state()` resume it exactly; orbax saves it with `grain.checkpoint.CheckpointSave`.

Records are read and encoded by a few threads a small window ahead of the packer (grain's default window of
500 made its next() poll 500 futures per record, half the pipeline's time). With `workers` > 0 the whole
pipeline runs in that many grain worker processes, each packing its own slice of the shuffled records:
on an accelerator host the Python pipeline, not the device, otherwise bounds the step. The batches then
depend on the number of workers (same workers, same batches; the state resumes exactly either way).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import grain
import numpy as np
from absl import flags

from homegen.data.builders import example_to_page_log, example_to_sequence
from homegen.data.formats import PageLog, Shelf, UserSequence
from homegen.data.relabel import item_words, relabeler, with_hindsight_intent
from homegen.data.vocab import NEXT_ITEM_SHELF, Encoded, Vocabulary


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    seq_len: int = 256
    batch_size: int = 32  # per process
    pack: bool = True
    shuffle_seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    stream_weight: float = 1.0  # extra loss weight per stream of a target item
    skip_weight: float = 1.0  # loss weight of a target item logged with no stream (1: imitated like any other)
    packing_bins: int = 0  # 0: batch_size
    outcome_conditioning: bool = False  # pages: add each page's bucketed streams to its context
    streamed_first: bool = False  # pages: train on shelves reordered with streamed items first
    user_tokens: bool = False  # pages: the user's id as a context token (`data.relabel.with_user`)
    unknown_user_fraction: float = 0.1  # with user_tokens: pages shown with the unknown-user token instead
    hindsight_intents: float = 0.0  # pages: this share of intent-less pages gets a hindsight intent (data.relabel)
    hindsight_intent_fields: tuple[str, ...] = ("mood", "genre")  # the item attributes it is written from
    workers: int = 0  # grain worker processes running the pipeline (0: in this process)

# Threads reading and encoding records ahead of the packer, and how many records they may hold ready.
READ_THREADS, READ_AHEAD = 4, 64


def sequence_to_page_log(user: UserSequence, max_items: int) -> PageLog:
    """A next-item sequence as the degenerate page: one NEXT_ITEM_SHELF holding the latest items."""
    return PageLog(user_id=user.user_id, page=[Shelf(NEXT_ITEM_SHELF, user.items[-max_items:])])


def sequence_capacity(vocab: Vocabulary, seq_len: int) -> int:
    """How many items of a next-item sequence fit a training row of `seq_len` (+1 shifted) tokens:
    BOS SEP SEP PAGE SHELF items... EOS."""
    return (seq_len - 4) // vocab.items.tokens_per_item


def encoder(vocab: Vocabulary, kind: str, config: PipelineConfig) -> Callable[[dict], Encoded]:
    """Stored record -> Encoded tokens, for `kind` in {'pages', 'sequences'}."""
    if kind == "pages":
        label = relabeler(config.outcome_conditioning, config.streamed_first, config.user_tokens,
                          config.unknown_user_fraction, hindsight_relabeling(vocab, config))
        return lambda example: vocab.encode(label(example_to_page_log(example)), config.stream_weight,
                                             config.skip_weight)
    if kind == "sequences":
        capacity = sequence_capacity(vocab, config.seq_len)
        return lambda example: vocab.encode(sequence_to_page_log(example_to_sequence(example), capacity))
    raise ValueError(f"unknown record kind {kind!r}")


def hindsight_relabeling(vocab: Vocabulary, config: PipelineConfig) -> Callable[[PageLog], PageLog] | None:
    """`with_hindsight_intent` over the vocabulary's item attributes, or None when the config asks for none."""
    if not config.hindsight_intents:
        return None
    if vocab.attributes is None:
        raise ValueError("data.hindsight_intents writes intents from item attributes: set "
                         "--config.data.item_attributes=True")
    fields = config.hindsight_intent_fields
    words = item_words(vocab.attributes, vocab.items.item_ids, fields)
    if not words:
        raise ValueError(f"data.hindsight_intents: no item has an attribute of the fields {list(fields)}")
    return functools.partial(with_hindsight_intent, words=words, fields=fields, share=config.hindsight_intents)


def _fixed_length(encoded: Encoded, length: int) -> dict[str, np.ndarray]:
    tokens, weights, outcomes = encoded.tokens[:length], encoded.weights[:length], encoded.outcomes[:length]
    n = len(tokens)
    pad = length - n
    return {"tokens": np.pad(tokens, (0, pad)), "weights": np.pad(weights, (0, pad)),
            "outcomes": np.pad(outcomes, (0, pad)), "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
            "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad))}


def _from_packed(batch: dict) -> dict[str, np.ndarray]:
    return {"tokens": batch["tokens"].astype(np.int32), "weights": batch["weights"].astype(np.float32),
            "outcomes": batch["outcomes"].astype(np.int32),
            "segment_ids": batch["tokens_segment_ids"].astype(np.int32),
            "positions": batch["tokens_positions"].astype(np.int32)}


class ProcessRows(grain.MapDataset):
    """This process's rows of each global batch: global batch b holds elements [b*B*n, (b+1)*B*n) of the
    parent, and process i reads rows [i*B, (i+1)*B) of it. The global batch is thus the same for any
    number of processes, and each process reads only its own rows."""

    def __init__(self, parent: grain.MapDataset, rows: int, index: int, count: int):
        super().__init__(parent)
        self._rows, self._index, self._count = rows, index, count

    def __len__(self) -> int:
        return len(self._parent) // (self._rows * self._count) * self._rows

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        block, row = divmod(j, self._rows)
        return self._parent[(block * self._count + self._index) * self._rows + row]


def make_dataset(source, vocab: Vocabulary, kind: str, config: PipelineConfig, shard_index: int = 0,
                 shard_count: int = 1) -> grain.IterDataset:
    """A batched IterDataset over this process's rows of `source` (a TFDS data source or any sequence).
    Without packing, the global batch does not depend on the number of processes; with packing, each
    process packs its own rows."""
    length = config.seq_len + 1
    encode = encoder(vocab, kind, config)
    ds = grain.MapDataset.source(source).shuffle(seed=config.shuffle_seed).repeat(config.num_epochs)
    if shard_count > 1:
        ds = ProcessRows(ds, config.batch_size, shard_index, shard_count)
    ds = ds.map(encode)
    read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD)
    if config.pack:
        ds = ds.map(lambda e: {"tokens": e.tokens[:length], "weights": e.weights[:length],
                               "outcomes": e.outcomes[:length]})
        packed = grain.experimental.FirstFitPackIterDataset(
            ds.to_iter_dataset(read), length_struct={"tokens": length, "weights": length, "outcomes": length},
            num_packing_bins=config.packing_bins or config.batch_size, seed=config.shuffle_seed)
        batches = packed.map(_from_packed).batch(config.batch_size, drop_remainder=True)
    else:
        batches = ds.map(lambda e: _fixed_length(e, length)).to_iter_dataset(read).batch(
            config.batch_size, drop_remainder=True)
    if config.workers <= 0:
        return batches
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller has parsed none
        flags.FLAGS.mark_as_parsed()
    return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))

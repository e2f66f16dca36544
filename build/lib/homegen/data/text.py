"""The sentencepiece model trained on a dataset's own text (intents, titles, artists, shelf names)."""

from __future__ import annotations

import io
from collections.abc import Iterable

import sentencepiece as spm


def train_sentencepiece(sentences: Iterable[str], vocab_size: int = 1000) -> bytes:
    """A unigram sentencepiece model (serialized) trained on `sentences`; the vocabulary shrinks to what the
    text supports when it is small."""
    text = [s.strip().lower() for s in sentences if s and s.strip()]
    if not text:
        text = ["empty"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, normalization_rule_name="nmt_nfkc_cf",
        minloglevel=2, num_threads=1, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0)
    return model.getvalue()


def load_sentencepiece(model: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model)

"""Token vocabulary and the page <-> token-sequence conversion.

Layout of token ids (contiguous ranges, in this order): specials, context tokens (`field=value`),
text pieces (the sentencepiece model), shelf tokens, item tokens. Items are reached only through an
`ItemTokenizer`, so that a semantic-ID tokenizer (several tokens per item) can replace the atomic one.

A training example reads:
    BOS ctx... SEP intent-pieces... SEP history-items... PAGE SHELF item... SHELF item... EOS
and only the part after PAGE is a target.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from homegen.data.attributes import ItemAttributes
from homegen.data.formats import CatalogItem, PageLog, Shelf, UserSequence
from homegen.data.relabel import BEST_OUTCOME, OUTCOME_FIELD
from homegen.data.semantic_ids import SemanticItems
from homegen.data.text import load_sentencepiece, train_sentencepiece

SPECIALS = ("<pad>", "<bos>", "<eos>", "<page>", "<sep>")
PAD, BOS, EOS, PAGE, SEP = range(len(SPECIALS))
NEXT_ITEM_SHELF = "next"  # the one shelf of a plain next-item sequence
UNKNOWN_VALUE = "<unk>"
# Stream outcome of a target token, the value head's label (0 so that padding carries no label).
NO_OUTCOME, SKIPPED, STREAMED = 0, 1, 2
VOCAB_FILE = "vocab.json"  # what `Vocabulary.save` writes
MAX_CATALOG_TEXTS = 1_000_000  # catalog item texts the sentencepiece model is trained on, at most
MAX_INTENTS = 100_000  # distinct intent texts it is trained on, at most (the first seen)


class ItemTokenizer(Protocol):
    """Maps item ids to short tuples of local tokens in [0, num_tokens) and back. Level l of a tuple
    holds token `level_offsets[l] + code`, with code < level_sizes[l]."""

    item_ids: list[str]
    index: dict[str, int]  # item id -> row of item_ids
    num_items: int
    tokens_per_item: int
    num_tokens: int
    level_sizes: list[int]
    level_offsets: list[int]

    def encode(self, item_id: str) -> tuple[int, ...] | None: ...
    def decode(self, codes: Sequence[int]) -> str | None: ...
    def code_table(self) -> np.ndarray: ...  # (items, tokens_per_item) codes, without level offsets
    def to_json(self) -> dict: ...


class AtomicItems:
    """One token per item."""

    tokens_per_item = 1

    def __init__(self, item_ids: Sequence[str]):
        self.item_ids = list(item_ids)
        self.index = {item: k for k, item in enumerate(self.item_ids)}
        if len(self.index) != len(self.item_ids):
            raise ValueError("duplicate item ids")
        self.num_items = self.num_tokens = len(self.item_ids)
        self.level_sizes, self.level_offsets = [self.num_tokens], [0]

    def encode(self, item_id: str) -> tuple[int, ...] | None:
        k = self.index.get(item_id)
        return None if k is None else (k,)

    def decode(self, codes: Sequence[int]) -> str | None:
        return self.item_ids[codes[0]] if len(codes) == 1 and 0 <= codes[0] < self.num_tokens else None

    def code_table(self) -> np.ndarray:
        return np.arange(self.num_tokens, dtype=np.int32)[:, None]

    def to_json(self) -> dict:
        return {"kind": "atomic", "item_ids": self.item_ids}


def item_tokenizer_from_json(data: dict) -> ItemTokenizer:
    if data.get("kind") == "atomic":
        return AtomicItems(data["item_ids"])
    if data.get("kind") == "semantic":
        return SemanticItems.from_json(data)
    raise ValueError(f"unknown item tokenizer kind {data.get('kind')!r}")


@dataclasses.dataclass
class Encoded:
    """A token sequence with its per-token loss weights (0 for context, > 0 for targets) and stream
    outcomes (every token of each logged item with known streams: SKIPPED or STREAMED; for a semantic ID
    the value head thus learns the stream probability of the item each code prefix leads to)."""

    tokens: np.ndarray  # int32 (T,)
    weights: np.ndarray  # float32 (T,): weight of predicting tokens[t] from tokens[:t]
    outcomes: np.ndarray  # int32 (T,): NO_OUTCOME, SKIPPED or STREAMED


class Vocabulary:
    """All token ids of a dataset; see the module docstring for the layout."""

    def __init__(self, context_tokens: Sequence[str], shelves: Sequence[str], items: ItemTokenizer,
                 sentencepiece_model: bytes, max_history: int = 50, attributes: ItemAttributes | None = None):
        if attributes is not None and (items.tokens_per_item != 1 or len(attributes.table) != items.num_items):
            raise ValueError("item attributes need atomic item tokens and one row per item")
        self.context_tokens = list(context_tokens)
        self.attributes = attributes  # embedded beside the item tokens (data.item_attributes)
        self.shelves = list(shelves)
        self.items = items
        self.sentencepiece_model = sentencepiece_model
        self.sp = load_sentencepiece(sentencepiece_model)
        self.max_history = max_history
        self.context_offset = len(SPECIALS)
        self.text_offset = self.context_offset + len(self.context_tokens)
        self.shelf_offset = self.text_offset + self.sp.get_piece_size()
        self.item_offset = self.shelf_offset + len(self.shelves)
        self.size = self.item_offset + items.num_tokens
        self._context_index = {t: k + self.context_offset for k, t in enumerate(self.context_tokens)}
        self._shelf_index = {s: k + self.shelf_offset for k, s in enumerate(self.shelves)}

    # --- token classes -------------------------------------------------------------------------------
    def is_shelf(self, token: int) -> bool:
        return self.shelf_offset <= token < self.item_offset

    def is_item(self, token: int) -> bool:
        return self.item_offset <= token < self.size

    def shelf_token(self, shelf: str) -> int | None:
        return self._shelf_index.get(shelf)

    def item_tokens(self, item_id: str) -> list[int] | None:
        codes = self.items.encode(item_id)
        return None if codes is None else [self.item_offset + c for c in codes]

    def conditions_on_outcome(self) -> bool:
        """Whether the vocabulary was built from outcome-labelled logs (see `with_outcome`)."""
        return f"{OUTCOME_FIELD}={BEST_OUTCOME}" in self._context_index

    def context_token_ids(self, context: dict[str, str]) -> list[int]:
        """Known `field=value` tokens, `field=<unk>` for unseen values of known fields."""
        out = []
        for key in sorted(context):
            token = self._context_index.get(f"{key}={context[key]}",
                                            self._context_index.get(f"{key}={UNKNOWN_VALUE}"))
            if token is not None:
                out.append(token)
        return out

    # --- sequences -----------------------------------------------------------------------------------
    def encode_prompt(self, context: dict[str, str], intent: str | None, history: Sequence[str],
                      max_intent_tokens: int | None = None) -> list[int]:
        """BOS ctx SEP intent SEP history PAGE: everything before the generated page (the intent's first
        `max_intent_tokens` pieces when given)."""
        tokens = [BOS, *self.context_token_ids(context), SEP]
        if intent:
            tokens += [self.text_offset + p for p in self.sp.encode(intent.lower())][:max_intent_tokens]
        tokens.append(SEP)
        for item in list(history)[-self.max_history:] if self.max_history else []:
            tokens += self.item_tokens(item) or []
        tokens.append(PAGE)
        return tokens

    def encode_page(self, page: Sequence[Shelf], stream_weight: float = 0.0, skip_weight: float = 1.0) -> Encoded:
        """SHELF item... EOS with per-token weights (1, plus `stream_weight` x streams for streamed items;
        `skip_weight` for an item logged with no stream, 1 for one logged without outcomes) and outcomes.
        Unknown shelves and items are dropped (and shelves left empty with them)."""
        tokens, weights, outcomes = [], [], []
        for shelf in page:
            shelf_token = self.shelf_token(shelf.shelf)
            if shelf_token is None:
                continue
            body, body_weights, body_outcomes = [], [], []
            for k, item in enumerate(shelf.items):
                codes = self.item_tokens(item)
                if codes is None:
                    continue
                stream = shelf.streams[k] if shelf.streams is not None else 0.0
                outcome = NO_OUTCOME if shelf.streams is None else STREAMED if stream > 0 else SKIPPED
                body += codes
                weight = skip_weight if outcome == SKIPPED else 1.0 + stream_weight * float(stream)
                body_weights += [weight] * len(codes)
                body_outcomes += [outcome] * len(codes)
            if body:
                tokens += [shelf_token, *body]
                weights += [1.0, *body_weights]
                outcomes += [NO_OUTCOME, *body_outcomes]
        return Encoded(np.asarray(tokens + [EOS], np.int32), np.asarray(weights + [1.0], np.float32),
                       np.asarray(outcomes + [NO_OUTCOME], np.int32))

    def encode(self, log: PageLog, stream_weight: float = 0.0, skip_weight: float = 1.0) -> Encoded:
        prompt = self.encode_prompt(log.context, log.intent, log.history)
        page = self.encode_page(log.page, stream_weight, skip_weight)
        return Encoded(np.concatenate([np.asarray(prompt, np.int32), page.tokens]),
                       np.concatenate([np.zeros(len(prompt), np.float32), page.weights]),
                       np.concatenate([np.zeros(len(prompt), np.int32), page.outcomes]))

    def decode_page(self, tokens: Sequence[int]) -> list[Shelf]:
        """The shelves of a generated token sequence (tokens after PAGE, up to EOS); raises ValueError for
        a sequence that breaks the page grammar."""
        tokens = list(tokens)
        if PAGE in tokens:
            tokens = tokens[tokens.index(PAGE) + 1:]
        page: list[Shelf] = []
        k = 0
        while k < len(tokens) and tokens[k] not in (EOS, PAD):
            token = tokens[k]
            if self.is_shelf(token):
                page.append(Shelf(self.shelves[token - self.shelf_offset], []))
                k += 1
                continue
            if not self.is_item(token) or not page:
                raise ValueError(f"token {token} at position {k} breaks the page grammar")
            n = self.items.tokens_per_item
            item = self.items.decode([t - self.item_offset for t in tokens[k:k + n]])
            if item is None:
                raise ValueError(f"tokens {tokens[k:k + n]} are not an item")
            page[-1].items.append(item)
            k += n
        return page

    # --- persistence ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """Everything the vocabulary is, the sentencepiece model included (base64), as JSON-ready data: what
        checkpoints store and `save` writes."""
        out = {"context_tokens": self.context_tokens, "shelves": self.shelves, "items": self.items.to_json(),
               "max_history": self.max_history,
               "sentencepiece_model": base64.b64encode(self.sentencepiece_model).decode("ascii")}
        if self.attributes is not None:
            out["item_attributes"] = self.attributes.to_json()
        return out

    def attribute_table(self) -> np.ndarray | None:
        """(size, per_item) attribute ids of every token (`ItemAttributes.token_table`), or None."""
        return None if self.attributes is None else self.attributes.token_table(self.size, self.item_offset)

    def attribute_word_table(self, per_attribute: int) -> np.ndarray:
        """(num_attributes + 1, per_attribute) the text tokens of each attribute's value (`ItemAttributes.words`,
        its first `per_attribute` sentencepiece pieces, the tokens an intent is written in), PAD elsewhere:
        the model adds their mean embedding to the attribute's, so an intent's words and the items whose
        metadata holds them share embeddings."""
        if self.attributes is None:
            raise ValueError("attribute words need item attributes (data.item_attributes)")
        out = np.full((self.attributes.num_attributes + 1, per_attribute), PAD, np.int32)
        for a, words in enumerate(self.attributes.words(), start=1):
            pieces = [self.text_offset + p for p in self.sp.encode(words)][:per_attribute] if words else []
            out[a, :len(pieces)] = pieces
        return out

    def with_items(self, items: ItemTokenizer) -> Vocabulary:
        """The same vocabulary over another item tokenizer with the same token layout (a catalog refresh)."""
        if items.num_tokens != self.items.num_tokens or items.tokens_per_item != self.items.tokens_per_item:
            raise ValueError("the new items change the token layout; the model would not fit them")
        return Vocabulary(self.context_tokens, self.shelves, items, self.sentencepiece_model, self.max_history,
                          self.attributes)

    def extended_with(self, newer: Vocabulary) -> Vocabulary:
        """This vocabulary plus the context tokens, shelves and (atomic) items of `newer` that it lacks, each
        appended to its own range; the sentencepiece model stays this one's, so every old token keeps its
        meaning (token ids after the first new context token move: see `token_map`). Semantic item IDs
        keep their codes: new items get codes from their metadata by a catalog refresh instead."""
        if self.items.to_json()["kind"] != newer.items.to_json()["kind"]:
            raise ValueError("the newer data uses another kind of item tokens than the trained model")
        if self.attributes is not None or newer.attributes is not None:
            raise ValueError("finetune.extend_vocabulary does not grow item attribute tables (data.item_attributes): "
                             "train the extended data from scratch")

        def union(old: list[str], new: list[str]) -> list[str]:
            known = set(old)
            return old + [t for t in new if t not in known]

        items = self.items
        if isinstance(items, AtomicItems):
            items = AtomicItems(union(items.item_ids, newer.items.item_ids))
        return Vocabulary(union(self.context_tokens, newer.context_tokens), union(self.shelves, newer.shelves),
                          items, self.sentencepiece_model, self.max_history)

    def token_map(self, extended: Vocabulary) -> np.ndarray:
        """(self.size,) int: the id in `extended` (from `extended_with`) of every token of this vocabulary."""
        out = np.arange(self.size)
        out[self.context_offset:self.text_offset] = [extended._context_index[t] for t in self.context_tokens]
        out[self.text_offset:self.shelf_offset] += extended.text_offset - self.text_offset
        out[self.shelf_offset:self.item_offset] = [extended._shelf_index[s] for s in self.shelves]
        out[self.item_offset:] += extended.item_offset - self.item_offset
        return out

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        """Inverse of `to_json`."""
        attributes = data.get("item_attributes")
        return cls(data["context_tokens"], data["shelves"], item_tokenizer_from_json(data["items"]),
                   base64.b64decode(data["sentencepiece_model"]), data.get("max_history", 50),
                   None if attributes is None else ItemAttributes.from_json(attributes))

    def save(self, directory: str) -> None:
        """Writes `directory/vocab.json` (`to_json`)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, VOCAB_FILE), "w") as f:
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, directory: str) -> Vocabulary:
        """The vocabulary `save` wrote to `directory`."""
        path = os.path.join(directory, VOCAB_FILE)
        try:
            with open(path) as f:
                return cls.from_json(json.load(f))
        except FileNotFoundError:
            raise FileNotFoundError(f"no vocabulary in {directory}: {path} is missing") from None


class VocabularyBuilder:
    """Counts what a dataset holds, in one streaming pass, and turns it into a Vocabulary. Builders that read
    separate parts of the logs merge (`merge`) into the builder that read them one after another."""

    def __init__(self, min_context_count: int = 1):
        self.min_context_count = min_context_count
        self.context = Counter()
        self.shelves: dict[str, None] = {}
        self.items: dict[str, None] = {}
        self.catalog_text: list[str] = []
        self.intents: dict[str, None] = {}  # distinct intents, first seen first (at most MAX_INTENTS)
        self.page_text: list[tuple[str, str]] = []  # ("intent", intent) / ("shelf", shelf), first seen first

    @property
    def text(self) -> list[str]:
        """What the sentencepiece model learns from: catalog texts, then intents and shelf names in the order
        the logs first showed them."""
        return self.catalog_text + [key if kind == "intent" else key.replace("_", " ") for kind, key in self.page_text]

    def add_catalog(self, catalog: Iterable[CatalogItem], max_texts: int = MAX_CATALOG_TEXTS, seed: int = 0) -> None:
        """Every catalog item's id, and the text of at most `max_texts` of them for the sentencepiece model (a
        seeded uniform sample of a larger catalog, so that a catalog of 10^7 items trains it in bounded memory)."""
        rng = random.Random(seed)
        texts: list[str] = []
        seen = 0
        for item in catalog:
            self.items.setdefault(item.item_id)
            text = item.text()
            if not text:
                continue
            seen += 1
            if len(texts) < max_texts:
                texts.append(text)
            elif (k := rng.randrange(seen)) < max_texts:  # reservoir sampling
                texts[k] = text
        self.catalog_text.extend(texts)

    def _add_text(self, kind: str, key: str) -> None:
        if kind == "intent":
            if key in self.intents or len(self.intents) >= MAX_INTENTS:
                return
            self.intents.setdefault(key)
        elif key in self.shelves:
            return
        else:
            self.shelves.setdefault(key)
        self.page_text.append((kind, key))

    def add_page(self, log: PageLog) -> None:
        for key, value in log.context.items():
            self.context[f"{key}={value}"] += 1
        if log.intent:
            self._add_text("intent", log.intent)
        for item in log.history:
            self.items.setdefault(item)
        for shelf in log.page:
            self._add_text("shelf", shelf.shelf)
            for item in shelf.items:
                self.items.setdefault(item)

    def merge(self, other: VocabularyBuilder) -> None:
        """Adds what `other` counted, as if its pages had been added here after this builder's own (item,
        shelf, intent and text order included). `other` must not have read a catalog: a catalog comes first."""
        if other.catalog_text:
            raise ValueError("merge a builder of page logs only; add the catalog to the builder merged into")
        self.context.update(other.context)
        for item in other.items:
            self.items.setdefault(item)
        for kind, key in other.page_text:
            self._add_text(kind, key)
        for shelf in other.shelves:  # a sequence's NEXT_ITEM_SHELF has no text
            self.shelves.setdefault(shelf)

    def pages_to_json(self) -> dict:
        """What a builder of page logs only counted (`merge`'s input), as JSON-ready data."""
        if self.catalog_text:
            raise ValueError("only a builder of page logs is saved; add the catalog where it is loaded")
        return {"context": dict(self.context), "items": list(self.items), "shelves": list(self.shelves),
                "page_text": self.page_text}

    @classmethod
    def pages_from_json(cls, data: dict) -> VocabularyBuilder:
        """Inverse of `pages_to_json`."""
        out = cls()
        out.context = Counter(data["context"])
        out.items = dict.fromkeys(data["items"])
        out.shelves = dict.fromkeys(data["shelves"])
        out.page_text = [(kind, key) for kind, key in data["page_text"]]
        out.intents = dict.fromkeys(key for kind, key in out.page_text if kind == "intent")
        return out

    def add_sequence(self, user: UserSequence) -> None:
        self.shelves.setdefault(NEXT_ITEM_SHELF)
        for item in user.items:
            self.items.setdefault(item)

    def sentencepiece(self, vocab_size: int = 1000) -> bytes:
        """A sentencepiece model of the text seen (catalog, intents, shelf names)."""
        return train_sentencepiece(self.text, vocab_size)

    def build(self, max_history: int = 50, sentencepiece_vocab: int = 1000, items: ItemTokenizer | None = None,
              sentencepiece_model: bytes | None = None, attributes: Mapping[str, Sequence] | None = None,
              max_attributes: int = 8) -> Vocabulary:
        """The vocabulary; `items` replaces the default atomic tokenizer over every item seen, and
        `sentencepiece_model` the one trained here; with `attributes` ({item id: attribute values}), each
        item's first `max_attributes` are embedded beside it."""
        fields = sorted({token.split("=", 1)[0] for token in self.context})
        context = sorted(t for t, n in self.context.items() if n >= self.min_context_count)
        context += [f"{field}={UNKNOWN_VALUE}" for field in fields]
        model = sentencepiece_model or self.sentencepiece(sentencepiece_vocab)
        items = items or AtomicItems(list(self.items))
        table = None if attributes is None else ItemAttributes.from_mapping(items.item_ids, attributes, max_attributes)
        return Vocabulary(context, list(self.shelves), items, model, max_history, table)

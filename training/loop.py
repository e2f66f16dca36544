"""The training loop behind train.py (importable, so tests run it in-process)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from homegen.data.formats import DataFormatError, iter_catalog, read_catalog
from homegen.data.pipeline import PipelineConfig, encoder, make_dataset
from homegen.data.vocab import Vocabulary
from homegen.model.lora import LoraConfig
from homegen.model.loss import PreferenceConfig, SampledSoftmax
from homegen.model.sharding import make_mesh
from homegen.model.transformer import TransformerConfig
from homegen.training.checkpoints import CheckpointError, Checkpoints, checkpoint_dir
from homegen.training.data import absolute_data_paths, build_vocabulary, prepare_data, resolve_source
from homegen.training.early_stopping import EarlyStopping
from homegen.training.extend import grow_parameters
from homegen.training.preemption import StopSignals
from homegen.training.preference import PreferencePairs, pair_dataset, preference_validation
from homegen.training.reporting import Reporter
from homegen.training.state import Trainer, count_params
from homegen.training.validation import RANKING_METHODS, make_ranker, ranking_metrics, validation_loss, validation_users

MAX_CATALOG_IN_CHECKPOINT = 200_000


class TrainingError(RuntimeError):
    """A clear, one-line reason the job cannot go on."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingStopped(TrainingError):
    """SIGTERM or SIGINT stopped the run after saving a checkpoint at `step`; the same command resumes it.
    Exit code 75 (EX_TEMPFAIL: try again)."""

    def __init__(self, message: str, step: int):
        super().__init__(message, exit_code=75)
        self.step = step


def validate_config(cfg, num_processes: int, batch_axis: int) -> None:
    t = cfg.train
    if t.steps < 1 or t.batch_size < 1 or t.grad_accum < 1:
        raise ValueError("train.steps, train.batch_size and train.grad_accum must be >= 1")
    if t.batch_size % num_processes:
        raise ValueError(f"train.batch_size={t.batch_size} must divide evenly over {num_processes} processes")
    if t.batch_size % (batch_axis * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of the mesh's batch axes "
                         f"({batch_axis}) x train.grad_accum ({t.grad_accum})")
    if cfg.loss.kind not in ("full", "sampled"):
        raise ValueError(f"loss.kind must be 'full' or 'sampled', got {cfg.loss.kind!r}")
    if not 0.0 <= cfg.loss.label_smoothing < 1.0:
        raise ValueError(f"loss.label_smoothing must be in [0, 1), got {cfg.loss.label_smoothing}")
    if cfg.loss.label_smoothing and cfg.loss.kind != "full":
        raise ValueError("loss.label_smoothing spreads the target over the whole vocabulary: it needs loss.kind='full'")
    if cfg.data.item_tokens not in ("atomic", "semantic"):
        raise ValueError(f"data.item_tokens must be 'atomic' or 'semantic', got {cfg.data.item_tokens!r}")
    if cfg.data.item_tokens == "semantic" and cfg.loss.kind != "full":
        raise ValueError("data.item_tokens='semantic' needs loss.kind='full' (its vocabulary is small)")
    if cfg.eval.ranking not in ("auto",) + RANKING_METHODS:
        raise ValueError(f"eval.ranking must be one of auto, {', '.join(RANKING_METHODS)}; got {cfg.eval.ranking!r}")
    if cfg.serve.stream_candidates < 1 or cfg.serve.prior_weight < 0 or cfg.serve.item_width < 1:
        raise ValueError(f"serve.stream_candidates must be >= 1, serve.item_width >= 1 and serve.prior_weight >= 0, "
                         f"got {cfg.serve.stream_candidates}, {cfg.serve.item_width} and {cfg.serve.prior_weight}")
    if cfg.serve.item_width > 1 and cfg.data.item_tokens != "semantic":
        raise ValueError("serve.item_width > 1 searches inside semantic IDs' codes: it needs data.item_tokens='semantic'")
    if cfg.model.value_head and cfg.data.source == "interactions":
        raise ValueError("model.value_head learns from the streams of logged pages; interaction data has none")
    if t.patience and t.eval_every > t.steps:
        raise ValueError(f"train.patience counts evaluations, but train.eval_every={t.eval_every} > "
                         f"train.steps={t.steps}")
    if cfg.data.seq_len < 16:
        raise ValueError("data.seq_len must be >= 16")
    if cfg.data.workers < 0:
        raise ValueError(f"data.workers must be >= 0 (0: batches prepared in the training process), got {cfg.data.workers}")
    if cfg.model.num_heads % cfg.mesh.tensor and cfg.mesh.tensor > 0:
        raise ValueError(f"model.num_heads={cfg.model.num_heads} must divide over mesh.tensor={cfg.mesh.tensor}")


def examples_in(batch: dict) -> int:
    """Training examples in a batch of rows (packed rows number their examples 1, 2, ... by segment), or
    of preference pairs."""
    if "segment_ids" not in batch:
        return len(batch["tokens"])
    return int(batch["segment_ids"].max(axis=1).sum())


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _catalog_for_checkpoint(path: str | None) -> dict | None:
    """The catalog's display fields, kept in the checkpoint up to `MAX_CATALOG_IN_CHECKPOINT` items (read
    streaming, stopping there); a larger catalog is kept as its path."""
    if not path:
        return None
    items = {}
    for _, item in iter_catalog(path):
        if len(items) == MAX_CATALOG_IN_CHECKPOINT:
            return {"path": os.path.abspath(path)}
        items[item.item_id] = item.display()
    return {"items": items}


def _load_or_build_vocabulary(cfg, workdir, prepared, checkpoints, init_from, resume_step, reporter: Reporter
                              ) -> tuple[Vocabulary, np.ndarray, dict]:
    """The run's vocabulary (from its checkpoint, the --init_from run, that run's extended with the data's
    new tokens, or built), item counts and the shelf -> items seen in the logs."""
    vocab_dir = os.path.join(workdir, "vocab")
    counts_path = os.path.join(vocab_dir, "item_counts.npy")
    shelves_path = os.path.join(vocab_dir, "shelf_items.json")
    vocab = base = None
    if checkpoints.steps():
        vocab = Vocabulary.from_json(checkpoints.read_meta(resume_step)[1]["vocab"])
    elif init_from:
        base = Vocabulary.from_json(Checkpoints(checkpoint_dir(init_from), read_only=True).read_meta()[1]["vocab"])
        vocab = None if cfg.finetune.extend_vocabulary else base
    elif cfg.finetune.extend_vocabulary:
        raise ValueError("finetune.extend_vocabulary extends a trained model's vocabulary: pass --init_from RUN")
    if jax.process_index() == 0 and not os.path.exists(counts_path):
        start = time.perf_counter()
        built, counts, shelf_items = build_vocabulary(cfg.data, prepared)
        print(f"vocabulary of {built.size:,} tokens ({len(built.items.item_ids):,} items, {cfg.data.item_tokens} "
              f"item tokens) built in {time.perf_counter() - start:.0f} s", flush=True)
        if vocab is None and base is not None:
            vocab = base.extended_with(built)
            reporter.message(f"extended the vocabulary of {init_from}: {_additions(base, vocab, built)}")
        vocab = vocab or built
        vocab.save(vocab_dir)
        with open(shelves_path, "w") as f:
            json.dump(shelf_items, f)
        np.save(counts_path, np.array([counts.get(i, 0) for i in vocab.items.item_ids], np.int64))
    _barrier("vocabulary")
    vocab = vocab or Vocabulary.load(vocab_dir)
    with open(shelves_path) as f:
        shelf_items = json.load(f)
    return vocab, np.load(counts_path), shelf_items


def _additions(base: Vocabulary, extended: Vocabulary, built: Vocabulary) -> str:
    """What extending `base` added (and which of the data's items a semantic vocabulary does not hold)."""
    new_shelves = extended.shelves[len(base.shelves):]
    text = (f"+{len(extended.context_tokens) - len(base.context_tokens)} context values, +{len(new_shelves)} shelf "
            f"types ({', '.join(new_shelves) or 'none'}), +{extended.items.num_items - base.items.num_items} items")
    missing = sum(1 for i in built.items.item_ids if i not in extended.items.index)
    if missing:
        text += (f"; {missing} of the data's items have no semantic ID in it and are left out of training "
                 "(serve.py --catalog gives new items codes from their metadata)")
    return text


def _eligibility(prepared, shelf_items: dict) -> dict:
    """How serving decides which items may stand on which shelf: the synthetic world's rules, the
    shelf/item pairs seen in the logs, or anything (plain next-item data)."""
    if prepared.world_dir:
        with open(os.path.join(prepared.world_dir, "world.json")) as f:
            return {"kind": "world", "world": json.load(f)}
    if prepared.kind == "pages":
        return {"kind": "observed", "shelf_items": shelf_items}
    return {"kind": "all"}


@dataclasses.dataclass
class RunResult:
    """What a finished run leaves: its last step, the metrics of that step (training, and validation when
    it evaluated), the training loss at every logged step, and the final state with its trainer and
    vocabulary."""

    step: int
    metrics: dict[str, float]
    losses: list[float]
    state: dict
    trainer: Trainer
    vocab: Vocabulary


def run(cfg, workdir: str, init_from: str | None = None, resume_step: int | None = None) -> RunResult:
    """Trains until cfg.train.steps, resuming from the workdir's newest readable checkpoint (or from
    `resume_step`; later steps are then set aside in WORKDIR/checkpoints_set_aside, not deleted)."""
    try:
        return _run(cfg, workdir, init_from, resume_step)
    except (ValueError, FileNotFoundError, CheckpointError, DataFormatError) as e:
        raise TrainingError(str(e)) from e


def _mesh(cfg, nproc: int):
    devices = jax.devices()
    if cfg.mesh.devices:  # the first N devices of every process
        devices = [d for p in range(nproc) for d in
                   [d for d in jax.devices() if d.process_index == p][:cfg.mesh.devices]]
    return make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)


def lora_config(cfg) -> LoraConfig | None:
    """The run's LoRA settings (None: it trains the parameters themselves)."""
    f = cfg.finetune
    if f.lora_rank < 0:
        raise ValueError(f"finetune.lora_rank must be >= 0, got {f.lora_rank}")
    if f.lora_rank and f.extend_vocabulary:
        raise ValueError("finetune.extend_vocabulary changes the embedding that LoRA adapters leave frozen: extend "
                         "in one run, then train adapters with --init_from that run")
    return LoraConfig(f.lora_rank, f.lora_alpha, f.lora_targets) if f.lora_rank else None


def _load_lora_base(trainer: Trainer, checkpoints: Checkpoints, init_from: str | None, resume_step: int | None,
                    reporter: Reporter) -> dict:
    """Sets `trainer.base` to the parameters the adapters train on: the base recorded in the run's own
    checkpoint, else `init_from`'s newest readable step; returns what the checkpoints record of it."""
    if checkpoints.steps():
        base = checkpoints.read_meta(resume_step)[1].get("lora")
        if base is None:
            raise ValueError(f"{checkpoints.directory} holds a run without LoRA adapters: finetune.lora_rank "
                             "must stay 0 to resume it (or start a new --workdir)")
        directory, step = base["base"], base["base_step"]
    elif init_from:
        directory, step = checkpoint_dir(init_from), None
    else:
        raise ValueError("finetune.lora_rank trains adapters on a trained model: pass --init_from RUN")
    step, trainer.base = Checkpoints(directory, read_only=True).restore_params(step, trainer.abstract_model_params())
    reporter.message(f"LoRA rank {trainer.lora.rank} on {', '.join(trainer.lora_paths)} of {directory} step {step}")
    lora = trainer.lora
    return {"base": os.path.abspath(directory), "base_step": step, "rank": lora.rank, "alpha": lora.alpha,
            "targets": lora.targets}


def _initial_state(trainer: Trainer, checkpoints: Checkpoints, train_iter, workdir: str, init_from: str | None,
                   resume_step: int | None, reporter: Reporter, vocab: Vocabulary, catalog_path: str | None
                   ) -> tuple[int, dict, dict]:
    """(step, state, progress) to start from: the run's own checkpoint (restoring the data iterator too),
    else the parameters of `init_from`'s newest readable step (grown to an extended vocabulary; fresh
    adapters with LoRA), else a fresh initialisation."""
    progress = {"examples": 0, "seconds": 0.0}  # training examples read and wall time, across resumes
    if checkpoints.steps():
        start, state = checkpoints.restore(resume_step, trainer.abstract_state(), train_iter)
        set_aside = os.path.join(workdir, "checkpoints_set_aside")
        moved = checkpoints.set_aside_after(start, set_aside)
        _barrier("set_aside")
        if moved:
            checkpoints.reload()
            reporter.message(f"moved the steps after {start} ({moved}) to {set_aside}")
        progress.update(checkpoints.read_meta(start)[1].get("progress", {}))
        reporter.message(f"resumed from step {start} in {checkpoints.directory}")
        return start, state, progress
    if trainer.lora:
        return 0, trainer.init_state(), progress
    if init_from:
        source = Checkpoints(checkpoint_dir(init_from), read_only=True)
        step, meta = source.read_meta()
        base_vocab = Vocabulary.from_json(meta["vocab"])
        if base_vocab.size == vocab.size:
            step, params = source.restore_params(step, trainer.abstract_state()["params"])
        else:  # an extended vocabulary: old rows copied, new ones started from metadata
            step, params = source.restore_params(step)
            params = grow_parameters(params, trainer.param_axes, base_vocab, vocab,
                                     read_catalog(catalog_path) if catalog_path else {})
        reporter.message(f"initialised from {init_from} step {step}; frozen: {trainer.train_cfg.freeze or 'nothing'}")
        return 0, trainer.init_state(params), progress
    return 0, trainer.init_state(), progress


def _report_cut_examples(source, vocab: Vocabulary, kind: str, pipeline_cfg: PipelineConfig, reporter: Reporter,
                         sample: int = 500) -> None:
    """Says how many of the first `sample` training examples are longer than a training row and are cut
    (a page of multi-token items easily is): the user then raises data.seq_len or lowers data.max_history."""
    encode = encoder(vocab, kind, pipeline_cfg)
    lengths = np.array([len(encode(source[k]).tokens) for k in range(min(sample, len(source)))])
    # A next-item row holds as many items as fit (data/pipeline.py:sequence_capacity); only its closing EOS,
    # which no ranking reads, may fall off the end.
    cut = lengths > pipeline_cfg.seq_len + 1 + (kind == "sequences")
    if cut.any():
        reporter.message(f"warning: {cut.mean():.0%} of the first {len(lengths)} training examples are longer than "
                         f"data.seq_len={pipeline_cfg.seq_len} (+1) tokens (longest {lengths.max()}) and are cut at "
                         "the end: raise --config.data.seq_len or lower --config.data.max_history")


def _preference_pairs(cfg, workdir: str, init_from: str | None) -> tuple[PreferencePairs, PreferencePairs] | None:
    """(training, validation) pairs of a preference stage (None without `preference.pairs`). The pairs must
    come from the run the stage starts from: their reference log-probabilities are that run's. Sets
    data.data_dir to that run's data when the config leaves it empty."""
    if not cfg.preference.pairs:
        return None
    pairs = PreferencePairs.load(cfg.preference.pairs)
    source = pairs.meta.get("checkpoint", "")
    if not Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True).steps():
        if not init_from:
            raise ValueError(f"the preference stage starts from the model that made the pairs: pass --init_from "
                             f"{source or 'RUN'}")
        if os.path.abspath(init_from) != os.path.abspath(source):
            raise ValueError(f"{cfg.preference.pairs} holds pairs made by {source}, whose log-probabilities are "
                             f"the stage's reference, but --init_from is {init_from}")
        newest = Checkpoints(checkpoint_dir(init_from), read_only=True).read_meta()[0]
        if pairs.meta.get("step") != newest:
            raise ValueError(f"{cfg.preference.pairs} holds pairs made at step {pairs.meta.get('step')} of {source}, "
                             f"but --init_from starts from its newest step {newest}: make the pairs from that step")
    if not cfg.data.data_dir and pairs.meta.get("data_dir"):
        cfg.data.data_dir = pairs.meta["data_dir"]
    return pairs.split(cfg.preference.validation_fraction, cfg.seed)


def _pipeline_config(cfg, nproc: int) -> PipelineConfig:
    """How this process turns the data into token rows: its share of the global batch, the data options."""
    return PipelineConfig(seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size // nproc, pack=cfg.data.pack,
                          shuffle_seed=cfg.seed, stream_weight=cfg.data.stream_weight,
                          skip_weight=cfg.data.skip_weight,                          outcome_conditioning=cfg.data.outcome_conditioning, streamed_first=cfg.data.streamed_first,
                          user_tokens=cfg.data.user_tokens, unknown_user_fraction=cfg.data.unknown_user_fraction,
                          hindsight_intents=cfg.data.hindsight_intents,
                          hindsight_intent_fields=tuple(f.strip() for f in cfg.data.hindsight_intent_fields.split(",")
                                                        if f.strip()),
                          workers=cfg.data.workers)


def _train_iterator(cfg, prepared, vocab: Vocabulary, pipeline_cfg: PipelineConfig, pairs, nproc: int,
                    reporter: Reporter):
    """This process's training batches: preference pairs in the preference stage, else the data's rows."""
    if pairs:
        train_pairs, validation_pairs = pairs
        if int(train_pairs.tokens.max()) >= vocab.size:
            raise ValueError(f"{cfg.preference.pairs} holds tokens beyond this run's vocabulary ({vocab.size:,})")
        reporter.message(f"preference stage: {len(train_pairs):,} training pairs, {len(validation_pairs):,} "
                         f"validation pairs from {cfg.preference.pairs}")
        return iter(pair_dataset(train_pairs, cfg.train.batch_size // nproc, cfg.seed, jax.process_index(), nproc))
    _report_cut_examples(prepared.sources["train"], vocab, prepared.kind, pipeline_cfg, reporter)
    return iter(make_dataset(prepared.sources["train"], vocab, prepared.kind, pipeline_cfg, jax.process_index(), nproc))


def _make_trainer(cfg, vocab: Vocabulary, item_counts, mesh, pairs) -> Trainer:
    """The model (sized by the vocabulary and its item attributes) and its sharded trainer, with the loss the
    config asks for (sampled softmax over the items' counts, the preference stage's DPO)."""
    words = cfg.data.attribute_words
    attribute_sizes = {} if vocab.attributes is None else {"num_attributes": vocab.attributes.num_attributes,
                                                           "attributes_per_item": vocab.attributes.per_item,
                                                           "attribute_words": words}
    if words and vocab.attributes is None:
        raise ValueError("data.attribute_words needs item attributes: set --config.data.item_attributes=True")
    model_cfg = TransformerConfig(vocab_size=vocab.size, **cfg.model.to_dict(), **attribute_sizes)
    sampled = None
    if cfg.loss.kind == "sampled":
        sampled = SampledSoftmax.create(vocab.item_offset, item_counts, cfg.loss.num_negatives, cfg.loss.sampler)
    preference = (PreferenceConfig(cfg.preference.beta, cfg.preference.chosen_nll_weight,
                                   cfg.preference.value_weight) if pairs else None)
    return Trainer(model_cfg, cfg.train, mesh, [tuple(r) for r in cfg.rules], sampled, cfg.seed,
                   cfg.loss.value_weight, lora_config(cfg), preference, cfg.loss.label_smoothing,
                   vocab.attribute_table(), vocab.attribute_word_table(words) if words else None)


def _run(cfg, workdir: str, init_from: str | None, resume_step: int | None) -> RunResult:
    # Where: the workdir, the mesh, the data source; the config checked against them.
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    leader, nproc = jax.process_index() == 0, jax.process_count()
    mesh = _mesh(cfg, nproc)
    cfg.data.source = resolve_source(cfg.data)
    validate_config(cfg, nproc, mesh.shape["data"] * mesh.shape["fsdp"])
    absolute_data_paths(cfg.data)
    reporter = Reporter(os.path.join(workdir, "tensorboard"), cfg.train.steps, enabled=leader)

    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), cfg.train.keep_last, cfg.train.keep_best,
                              cfg.train.async_checkpoints, best_metric=cfg.train.best_metric,
                              best_mode=cfg.train.best_mode)
    if resume_step is not None:  # before the data is prepared: a wrong step fails at once
        checkpoints.check_step(resume_step)

    # Data and vocabulary.
    pairs = _preference_pairs(cfg, workdir, init_from)
    prepared = prepare_data(cfg.data, os.path.join(workdir, "tfds"), leader, _barrier)
    vocab, item_counts, shelf_items = _load_or_build_vocabulary(cfg, workdir, prepared, checkpoints, init_from,
                                                                resume_step, reporter)
    pipeline_cfg = _pipeline_config(cfg, nproc)
    train_iter = _train_iterator(cfg, prepared, vocab, pipeline_cfg, pairs, nproc, reporter)

    # Model, trainer and the state to start from.
    trainer = _make_trainer(cfg, vocab, item_counts, mesh, pairs)
    model_cfg = trainer.model_cfg
    lora_base = _load_lora_base(trainer, checkpoints, init_from, resume_step, reporter) if trainer.lora else None
    start, state, progress = _initial_state(trainer, checkpoints, train_iter, workdir, init_from, resume_step,
                                            reporter, vocab, prepared.catalog_path)
    trained = f" ({count_params(state['params']):,} of them LoRA adapters)" if trainer.lora else ""
    reporter.message(f"model: {count_params(trainer.abstract_params):,} parameters{trained}; vocabulary {vocab.size:,} tokens; "
                     f"mesh {dict(mesh.shape)}; {nproc} process(es)")
    if vocab.attributes is not None:
        reporter.message(f"item attributes: {vocab.attributes.num_attributes:,} values, at most "
                         f"{vocab.attributes.per_item} per item, {vocab.attributes.coverage():.1%} of items have some")
    meta = {"config": json.loads(cfg.to_json()), "model": dataclasses.asdict(model_cfg),
            "vocab": vocab.to_json(), "kind": prepared.kind,
            "catalog": _catalog_for_checkpoint(prepared.catalog_path),
            "eligibility": _eligibility(prepared, shelf_items), "lora": lora_base,
            "preference": {"pairs": os.path.abspath(cfg.preference.pairs), **pairs[0].meta} if pairs else None}

    # Validation.
    ranker = (make_ranker(trainer, vocab, cfg) if cfg.eval.next_item and prepared.kind == "sequences" else None)
    eval_users = validation_users(prepared.sources["validation"], cfg.eval.max_users) if ranker else None

    def evaluate(step: int) -> dict[str, float]:
        out, params = {}, trainer.model_params(state["params"])
        if "validation" in prepared.sources and len(prepared.sources["validation"]):
            out.update(validation_loss(trainer, params, prepared.sources["validation"], vocab,
                                       prepared.kind, pipeline_cfg, cfg.train.eval_batches,
                                       jax.process_index(), nproc))
        if pairs:
            out.update(preference_validation(trainer, params, pairs[1], cfg.train.batch_size))
        if ranker:
            metrics = ranking_metrics(ranker.rank(params, eval_users, cfg.eval.filter_seen), ks=(10,))
            out.update({f"validation_{k}": v for k, v in metrics.items() if k != "mrr"})
        reporter.scalars(step, out)
        reporter.message(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    # The loop.
    last_good = start if checkpoints.steps() else None
    end = cfg.train.steps
    losses: list[float] = []
    metrics: dict[str, float] = {}
    stopper = EarlyStopping.restore(cfg.train.best_metric, cfg.train.best_mode, cfg.train.patience,
                                    progress.get("early_stopping"))
    if stopper.should_stop and start < end:
        reporter.message(f"stopped early at step {start} before: {stopper.reason()}; nothing to do "
                         "(raise train.patience to train on)")
        end = start
    tokens_per_batch = cfg.train.batch_size * (pairs[0].tokens[0].size if pairs else cfg.data.seq_len)
    reporter.begin(start)
    train_size = len(pairs[0]) if pairs else len(prepared.sources["train"])
    resumed_at, seconds_before = time.time(), progress["seconds"]
    with StopSignals() as signals, contextlib.closing(train_iter):  # closing: ends grain's worker processes
        for step in range(start + 1, end + 1):
            local = next(train_iter)
            if step == 1 and model_cfg.value_head and "outcomes" in local and not np.any(local["outcomes"]):
                raise ValueError("model.value_head=True, but the first training batch has no item with known streams: "
                                 "the page logs carry no `streams` (FORMATS.md §3), so the value head cannot learn")
            progress["examples"] += examples_in(local) * nproc
            state, step_metrics = trainer.train_step(state, trainer.global_batch(local))
            reporter.add_tokens(tokens_per_batch)
            at_log = step % cfg.train.log_every == 0 or step == end
            at_eval = step % cfg.train.eval_every == 0 or step == end
            stopping = signals.should_stop(step) and step < end
            at_checkpoint = step % cfg.train.checkpoint_every == 0 or step == end or stopping
            if not (at_log or at_eval or at_checkpoint):
                continue
            host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])):
                checkpoints.wait()
                where = (f"the last good checkpoint is step {last_good} in {checkpoints.directory}"
                         if last_good is not None else "no checkpoint was written")
                raise TrainingError(f"loss became {host['loss']} (gradient norm {host['grad_norm']}) at step "
                                    f"{step}; stopping; {where}", exit_code=3)
            losses.append(host["loss"])
            if at_log:
                reporter.log(step, host)
            eval_metrics = evaluate(step) if at_eval else {}
            if at_eval:
                stopper.update(step, eval_metrics)
            early = stopper.should_stop and step < end
            metrics = {**host, **eval_metrics}
            new_best = at_eval and stopper.patience > 0 and stopper.best_step == step  # keep every best step
            if at_checkpoint or early or new_best:
                progress.update(seconds=seconds_before + time.time() - resumed_at,
                                epochs=progress["examples"] / max(train_size, 1), early_stopping=stopper.state())
                checkpoints.save(step, state, train_iter, {**meta, "progress": progress}, eval_metrics or None)
                last_good = step
            if stopping:
                checkpoints.close()
                reporter.close()
                raise TrainingStopped(f"stopped by {signals.received} at step {step} of {end}: saved checkpoint "
                                      f"{step} in {checkpoints.directory}; the same command resumes from it", step)
            if early:
                reporter.message(f"early stop at step {step} of {end}: {stopper.reason()}")
                end = step
                break
    checkpoints.close()
    reporter.close()
    return RunResult(end, metrics, losses, state, trainer, vocab)

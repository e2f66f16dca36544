"""Defaults shared by every config; each configs/<name>.py starts from `base_config()`."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"  # auto (from which data file is set) | synthetic | page_logs | interactions
    c.data.preset = "tiny"  # synthetic world size: tiny | small | medium | large
    c.data.page_logs = ""  # FORMATS.md §3 JSON Lines (comma-separated for several files)
    c.data.catalog = ""  # FORMATS.md §2 JSON Lines
    # page_logs served in a synthetic world (its folder, with world.json): serving uses the world's shelf rules
    # and scripts/evaluate.py judges pages under its response model, as for the synthetic source
    c.data.world = ""
    c.data.interactions = ""  # FORMATS.md §1 file
    c.data.interactions_format = "auto"
    c.data.data_dir = ""  # TFDS folder; default WORKDIR/tfds
    c.data.validation_fraction = 0.05
    c.data.seq_len = 256
    c.data.pack = True
    c.data.workers = 0  # grain worker processes preparing training batches (0: the training process; docs/COMMANDS.md)
    c.data.stream_weight = 1.0
    # Pages: loss weight of an item shown and not streamed (1: the policy imitates whole logged pages; below 1 it
    # learns mostly from what earned streams, e.g. its own served pages; the value head learns from both)
    c.data.skip_weight = 1.0
    c.data.streamed_first = False  # pages: train on shelves reordered with streamed items first
    c.data.outcome_conditioning = False  # pages: condition on the page's bucketed streams; serve the best bucket
    c.data.user_tokens = False  # pages: a context token per user seen in training (data/relabel.py:with_user)
    c.data.unknown_user_fraction = 0.1  # with user_tokens: training pages shown as an unknown user
    # Pages: this share of the pages logged without an intent is shown with one written from what was streamed
    # on it, the streamed items' most common value of each field (data/relabel.py:with_hindsight_intent;
    # needs data.item_attributes)
    c.data.hindsight_intents = 0.0
    c.data.hindsight_intent_fields = "mood,genre"
    c.data.max_history = 30
    c.data.sentencepiece_vocab = 1000
    c.data.min_context_count = 1
    c.data.item_tokens = "atomic"  # atomic (one token per item) | semantic (a tuple of codes per item)
    c.data.semantic_levels = 3  # residual k-means levels, plus one collision code
    c.data.semantic_codes = 256  # codes per level
    c.data.semantic_dim = 64  # item embedding size the codes quantise
    c.data.semantic_from = ""  # an atomic run whose trained item embeddings the codes quantise (default: data's)
    c.data.hold_out_shelves = ""  # comma-separated shelf types the vocabulary leaves out (introduced later)
    c.data.hold_out_release_days = 0  # synthetic world: leave out the items of the last N days (released after training)
    c.data.semantic_max_sequences = 200_000  # pages whose items semantic IDs learn co-occurrence from
    c.data.semantic_fit_items = 1_000_000  # items the codes are fitted on; the rest are coded from metadata
    c.data.item_attributes = False  # atomic items: embed each item's attributes beside its token (data/attributes.py)
    c.data.max_item_attributes = 8  # attributes embedded per item (its first ones)
    # > 0: an attribute's embedding adds its value's words (at most this many text tokens, the ones intents are
    # written in), so "jazz" in an intent and genre=jazz share an embedding (needs data.item_attributes)
    c.data.attribute_words = 0
    c.data.item_features = ""  # {item_id: [attribute ids]} JSON (S3-Rec); default: NAME_item2attributes.json by NAME.txt

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 128
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 32
    c.model.mlp_dim = 512
    c.model.dropout = 0.0  # residual branches of every block
    c.model.embed_dropout = 0.0  # input token embeddings
    c.model.tie_embeddings = True
    c.model.scan_layers = True
    c.model.remat = "none"  # none | full | dots
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.fused_attention = False  # cuDNN flash attention in training where the GPU and dtype allow it
    c.model.value_head = False  # pages: also learn each item's stream probability; beam search maximises it

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "full"  # full | sampled
    c.loss.num_negatives = 1024
    c.loss.sampler = "popularity"  # uniform | popularity
    c.loss.label_smoothing = 0.0  # full softmax: share of each target spread evenly over the vocabulary
    c.loss.value_weight = 1.0  # value head's cross-entropy per logged item, against the next-token loss

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 32  # global, in sequences
    c.train.grad_accum = 1
    c.train.learning_rate = 1e-3
    c.train.final_lr_fraction = 0.1
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.01
    c.train.clip_norm = 1.0
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.freeze = ""  # comma-separated regexps of parameter paths, e.g. "embed,blocks/attn"
    # "rowwise_adagrad": the token embedding table by row-wise Adagrad (one accumulator per row, untouched rows
    # stay still) instead of AdamW (two moments per parameter): a fraction of the optimizer state for 10^6+ items
    c.train.embedding_optimizer = "adamw"
    c.train.embedding_learning_rate = 0.0  # with rowwise_adagrad: its peak rate (0: 10 x train.learning_rate)
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.eval_batches = 8
    c.train.checkpoint_every = 500
    c.train.keep_last = 3
    c.train.keep_best = 1
    c.train.best_metric = "validation_loss"  # checkpoints kept as best, and the one evaluate.py picks
    c.train.best_mode = "min"
    c.train.patience = 0  # > 0: stop when best_metric has not improved for this many evaluations (0: never)
    c.train.async_checkpoints = True

    c.finetune = ml_collections.ConfigDict()
    c.finetune.lora_rank = 0  # > 0: train LoRA adapters of this rank on --init_from's parameters, nothing else
    c.finetune.lora_alpha = 16.0  # adapters' updates are scaled by lora_alpha / lora_rank
    c.finetune.lora_targets = "blocks/attn,blocks/mlp"  # regexps of parameter paths, as train.freeze
    # With --init_from: add the data's new context values, shelf types and items to the trained vocabulary
    # (old rows kept bit for bit, new rows started from metadata: training/extend.py).
    c.finetune.extend_vocabulary = False

    # Preference stage (DPO): train on pairs of pages (scripts/preference_pairs.py) from --init_from, the
    # run that made them; `preference_stage` below sets the rest of a stage's settings.
    c.preference = ml_collections.ConfigDict()
    c.preference.pairs = ""  # folder of preference pairs; set: the run trains on them instead of the logs
    c.preference.beta = 0.1
    c.preference.chosen_nll_weight = 0.0
    c.preference.value_weight = 1.0  # hold the value head to the pairs' stream probabilities
    c.preference.validation_fraction = 0.05  # pairs held out for validation_preference_* metrics

    c.eval = ml_collections.ConfigDict()
    c.eval.next_item = False  # HR@10 / NDCG@10 over all items on validation users (interaction data)
    c.eval.max_users = 2000
    c.eval.filter_seen = False  # next-item validation: remove the user's earlier items from the ranking
    c.eval.batch_size = 64
    c.eval.ranking = "auto"  # score (all items at the last position) | beam | auto: score if atomic
    c.eval.beam_size = 50  # items found by beam ranking (metrics@K need K <= beam_size)

    # Beam search's settings (model/decoding.py), chosen on validation requests: scripts/evaluate.py --split
    # validation --stream_candidates N --prior_weight W --item_width I tries others on a trained checkpoint.
    c.serve = ml_collections.ConfigDict()
    c.serve.stream_candidates = 32  # `streams`: items considered per step, the model's most likely allowed ones
    c.serve.prior_weight = 0.01  # `streams`: weight of every token's log-probability next to the predicted streams
    c.serve.item_width = 1  # semantic IDs: hypotheses per beam inside an item (1: cut at every code)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.devices = 0  # use the first N devices of every process (0: all)
    c.rules = [
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("layers", None),
    ]
    return c


def preference_stage(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A config's preference stage: a few hundred DPO steps at a low learning rate, without dropout (so the
    policy starts equal to the reference), the checkpoint kept as best by validation pairs' DPO loss.
    Run it with --init_from the run that made the pairs and --config.preference.pairs=FOLDER."""
    c.model.dropout = 0.0
    c.model.embed_dropout = 0.0
    c.train.steps = 400
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 20
    c.train.final_lr_fraction = 1.0
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.best_metric = "validation_preference_loss"
    return c

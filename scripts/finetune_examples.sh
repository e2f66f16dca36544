#!/usr/bin/env bash
# The worked examples of docs/FINETUNING.md on the demo's tiny synthetic world, measured on its validation
# requests (its last 100; the first 100, the test requests, are not looked at):
#   A. a new shelf type: a model trained without "new_releases", its vocabulary extended and fine-tuned briefly,
#      against the same model trained as long without the new shelf, and a model trained on everything;
#   B. LoRA (rank 8 on attention and MLP) against a full fine-tune of the same steps.
#
#   bash scripts/finetune_examples.sh [RUNS_DIR]     (PYTHON=... the interpreter)
set -euo pipefail
RUNS=${1:-runs/finetune_examples}
PY=${PYTHON:-.venv/bin/python}
FT=(--config.train.steps=100 --config.train.warmup_steps=10 --config.train.learning_rate=1e-3
    --config.train.eval_every=100 --config.train.checkpoint_every=100 --config.train.log_every=50)
train() { local name=$1; shift; /usr/bin/time -f "$name: %e s, %M KB" $PY train.py --config configs/demo.py \
  --workdir "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1 || { tail -5 "$RUNS/$name.log"; exit 1; }; }
evaluate() { $PY scripts/evaluate.py --checkpoint "$RUNS/$1" --split validation --max_users 100 \
  --watch_shelf new_releases > "$RUNS/$1.eval.txt" 2>&1; echo "== $1"; grep -A12 "page quality" "$RUNS/$1.eval.txt"; }
mkdir -p "$RUNS"

# A. A new shelf type.
train without_new_shelf --config.data.hold_out_shelves=new_releases
train extended --init_from "$RUNS/without_new_shelf" --config.finetune.extend_vocabulary=True "${FT[@]}"
train continued --init_from "$RUNS/without_new_shelf" --config.data.hold_out_shelves=new_releases "${FT[@]}"
train everything
for run in without_new_shelf extended continued everything; do evaluate $run; done
grep -h "extended the vocabulary" "$RUNS/extended.log" || true

# B. LoRA against a full fine-tune, from the model trained on everything.
FT_LONG=("${FT[@]}" --config.train.steps=300 --config.train.eval_every=300 --config.train.checkpoint_every=300)
train lora --init_from "$RUNS/everything" --config.finetune.lora_rank=8 "${FT_LONG[@]}"
train full_finetune --init_from "$RUNS/everything" "${FT_LONG[@]}"
for run in lora full_finetune; do
  evaluate $run
  grep -h "model:\|eval step\|tok/s" "$RUNS/$run.log" | tail -3
  du -sh "$RUNS/$run/checkpoints"
done
du -sh "$RUNS/everything/checkpoints"

# Paired differences on the same validation requests (B - A).
compare() { echo "== B=$2 against A=$1"; $PY scripts/compare_pages.py "$RUNS/$1/eval/results.json" \
  "$RUNS/$2/eval/results.json" --method "homegen beam search (streams)" --method "homegen beam search (likelihood)" \
  --method "homegen sampling" --method "pointwise (same model)"; }
compare continued extended
compare without_new_shelf extended
compare everything lora
compare everything full_finetune
compare lora full_finetune

#!/usr/bin/env bash
# The accelerator checks in docs/BENCHMARKS.md, on one GPU machine, in one go:
#   1. configs/gpu_100m.py's training step time and MFU (scripts/benchmark_train.py), as configured and
#      without rematerialisation;
#   2. train.py started as a one-task SLURM job (its environment variables only) trains the demo model on
#      the GPU, is preempted by SIGTERM mid-run, and the relaunch ends equal to an uninterrupted run. XLA's
#      GPU reductions are not deterministic by default (two uninterrupted runs differ too), so this part
#      runs with --xla_gpu_deterministic_ops=true; DETERMINISTIC=0 leaves it out;
#   3. the serving scale table (scripts/benchmark_scale.py): semantic IDs at 10^4, 10^6 and 10^7 items, and
#      atomic tokens at the same sizes (run after part 4: the slowest), batch 1 and 64, beam 4, every page
#      checked;
#   4. a profile of gpu_100m's train step: the ops that take the most GPU time (trace kept in RESULTS), with
#      XLA's attention and with cuDNN's fused attention (model.fused_attention), and the latter without remat;
#      first, scripts/check_fused_attention.py: the two attentions agree on packed rows with padding;
#   5. Sports next-item with semantic IDs at more capacity than configs/amazon_sports.py:semantic (4 layers of
#      d=256 instead of 2 of 128; with 20 and with 50 history items): each trained with the config's early
#      stopping on validation users (seen filtered N@10) within PART_TIMEOUT, then the one with the best
#      validation figure, and only that one, evaluated on the test users.
#
#   bash scripts/gpu_checks.sh [RESULTS_DIR]
#   (PYTHON=... the interpreter; TRAIN=... train.py's path; PARTS="1 2 3 4" the parts to run; DEMO_STEPS=300;
#    PART_TIMEOUT=seconds that each run of parts 3, 4 and 5 may take, 0 for none; SCALE_ITEMS=10000,1000000,10000000;
#    SCALE_BATCHES=1,64; PROFILE_DIR=where part 4's full trace goes, RESULTS/profile unless set; SPORTS=the
#    Sports sequence file, the config's default unless set; WORK_DIR=where part 5's runs go, RESULTS unless set;
#    SPORTS_FLAGS=config flags added to every part 5 run; DATA_WORKERS=part 5's grain worker processes, 8)
set -uo pipefail
RESULTS=$(mkdir -p "${1:-runs/gpu_checks}" && cd "${1:-runs/gpu_checks}" && pwd)
PY=$(command -v "${PYTHON:-python3}")
TRAIN=${TRAIN:-train.py}
STEPS=${DEMO_STEPS:-300}
PARTS=" ${PARTS:-1 2 3 4} "
LIMIT=(timeout "${PART_TIMEOUT:-0}")
SCALE=(scripts/benchmark_scale.py --items "${SCALE_ITEMS:-10000,1000000,10000000}" --batches "${SCALE_BATCHES:-1,64}"
       --train_steps 0)
PROFILE_DIR=${PROFILE_DIR:-$RESULTS/profile}
WORK_DIR=${WORK_DIR:-$RESULTS}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

if [[ $PARTS == *" 1 "* ]]; then
  echo "== 1. gpu_100m step time and MFU"
  $PY scripts/benchmark_train.py --config configs/gpu_100m.py --steps 20 2>&1 | tee "$RESULTS/gpu_100m.txt"
  $PY scripts/benchmark_train.py --config configs/gpu_100m.py --steps 20 --config.model.remat=none 2>&1 \
    | tee "$RESULTS/gpu_100m_no_remat.txt"
fi

if [[ $PARTS == *" 3 "* ]]; then
  echo "== 3. serving cost against the catalog size"
  "${LIMIT[@]}" $PY "${SCALE[@]}" --item_tokens semantic --calls 10 2>&1 | tee "$RESULTS/scale_semantic.txt"
fi

if [[ $PARTS == *" 4 "* ]]; then
  echo "== 4. gpu_100m train step profile"
  $PY scripts/check_fused_attention.py 2>&1 | tee "$RESULTS/fused_attention_check.txt"
  for fused in false true; do
    "${LIMIT[@]}" $PY scripts/benchmark_train.py --config configs/gpu_100m.py --steps 10 --noxla_flops \
      --config.model.fused_attention=$fused --profile_dir "$PROFILE_DIR/fused_$fused" --profile_steps 3 2>&1 \
      | tee "$RESULTS/gpu_100m_profile_fused_$fused.txt"
    find "$PROFILE_DIR/fused_$fused" -name perfetto_trace.json.gz -exec cp {} "$RESULTS/gpu_100m_trace_fused_$fused.json.gz" \;
  done
  "${LIMIT[@]}" $PY scripts/benchmark_train.py --config configs/gpu_100m.py --steps 10 --noxla_flops \
    --config.model.fused_attention=true --config.model.remat=none 2>&1 | tee "$RESULTS/gpu_100m_fused_no_remat.txt"
fi

if [[ $PARTS == *" 5 "* ]]; then
  echo "== 5. Sports semantic IDs at more capacity: chosen on validation, test once"
  sports=("$TRAIN" --config configs/amazon_sports.py:semantic ${SPORTS:+--config.data.interactions="$SPORTS"}
          --config.data.data_dir="$WORK_DIR/sports_tfds" --config.model.d_model=256 --config.model.num_layers=4
          --config.model.num_heads=4 --config.model.num_kv_heads=4 --config.model.mlp_dim=1024
          --config.data.workers="${DATA_WORKERS:-8}" ${SPORTS_FLAGS:-})
  for variant in history20 history50; do
    history=()  # 50 history items + the target at 4 codes each, in rows of as many tokens per step as 20
    [ $variant = history50 ] && history=(--config.data.seq_len=208 --config.train.batch_size=20)
    start=$(date +%s)
    "${LIMIT[@]}" $PY "${sports[@]}" "${history[@]}" --workdir "$WORK_DIR/sports_$variant" \
      > "$RESULTS/sports_$variant.log" 2>&1
    echo "$variant: exit $? in $(( $(date +%s) - start )) s; $(grep -m1 'model:' "$RESULTS/sports_$variant.log")"
    grep "^eval step" "$RESULTS/sports_$variant.log"
  done
  best=$($PY - "$RESULTS" <<'EOF'
import re, sys
best = {}
for variant in ("history20", "history50"):
    scores = re.findall(r"validation_ndcg@10 ([0-9.]+)", open(f"{sys.argv[1]}/sports_{variant}.log").read())
    best[variant] = max(map(float, scores), default=-1.0)
print(max(best, key=best.get))
EOF
)
  echo "best on validation: $best; its test users:"
  "${LIMIT[@]}" $PY scripts/evaluate.py --checkpoint "$WORK_DIR/sports_$best" --split test --max_users 0 \
    --out "$RESULTS/sports_test" 2>&1 | grep -v WARNING | tee "$RESULTS/sports_test.txt"
fi

if [[ $PARTS == *" 3 "* ]]; then
  "${LIMIT[@]}" $PY "${SCALE[@]}" --item_tokens atomic --calls 3 2>&1 | tee "$RESULTS/scale_atomic.txt"
fi

[[ $PARTS == *" 2 "* ]] || exit 0
echo "== 2. SLURM-launched demo training, SIGTERM mid-run, relaunch"
xla_flags="${XLA_FLAGS:-}"
[ "${DETERMINISTIC:-1}" = 1 ] && xla_flags="$xla_flags --xla_gpu_deterministic_ops=true"
slurm_env=(env XLA_FLAGS="$xla_flags" SLURM_JOB_ID=4242 SLURM_STEP_NODELIST=localhost SLURM_NTASKS=1 SLURM_PROCID=0 SLURM_LOCALID=0)
train=("${slurm_env[@]}" "$PY" "$TRAIN" --config configs/demo.py --config.train.steps="$STEPS"
       --config.train.log_every=10 --config.train.checkpoint_every=1000)
start=$(date +%s)
"${train[@]}" --workdir "$RESULTS/straight" > "$RESULTS/straight.log" 2>&1
echo "uninterrupted: exit $? in $(( $(date +%s) - start )) s; $(grep -m1 'model:' "$RESULTS/straight.log")"
"${train[@]}" --workdir "$RESULTS/preempted" > "$RESULTS/preempted.log" 2>&1 &
pid=$!
until grep -q "] step 100/" "$RESULTS/preempted.log" 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
kill -TERM $pid
wait $pid
echo "preempted: exit $?; $(grep 'stopped by' "$RESULTS/preempted.log")"
"${train[@]}" --workdir "$RESULTS/preempted" > "$RESULTS/resumed.log" 2>&1
echo "relaunched: exit $?; $(grep -m1 'resumed from' "$RESULTS/resumed.log")"
(cd /tmp && $PY - "$RESULTS") <<'EOF'
import os, sys
import jax, numpy as np
from homegen.training.checkpoints import Checkpoints
runs = sys.argv[1]
a, b = (Checkpoints(os.path.join(runs, r, "checkpoints"), read_only=True).restore_params(None)
        for r in ("straight", "preempted"))
print("final steps", a[0], b[0])
diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
         for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1]))]
print(f"parameters bitwise equal: {max(diffs) == 0.0}; largest difference {max(diffs):.3g} over {len(diffs)} arrays")
EOF

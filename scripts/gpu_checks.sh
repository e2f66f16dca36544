#!/usr/bin/env bash
# The accelerator checks in docs/BENCHMARKS.md, on one GPU machine, in one go:
#   1. configs/gpu_100m.py's training step time and MFU (scripts/benchmark_train.py), as configured and
#      without rematerialisation;
#   2. train.py started as a one-task SLURM job (its environment variables only) trains the demo model on
#      the GPU, is preempted by SIGTERM mid-run, and the relaunch ends equal to an uninterrupted run. XLA's
#      GPU reductions are not deterministic by default (two uninterrupted runs differ too), so this part
#      runs with --xla_gpu_deterministic_ops=true; DETERMINISTIC=0 leaves it out.
#
#   bash scripts/gpu_checks.sh [RESULTS_DIR]
#   (PYTHON=... the interpreter; TRAIN=... train.py's path; BENCH=0 skips part 1; DEMO_STEPS=300)
set -uo pipefail
RESULTS=$(mkdir -p "${1:-runs/gpu_checks}" && cd "${1:-runs/gpu_checks}" && pwd)
PY=$(command -v "${PYTHON:-python3}")
TRAIN=${TRAIN:-train.py}
STEPS=${DEMO_STEPS:-300}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

if [ "${BENCH:-1}" = 1 ]; then
  echo "== 1. gpu_100m step time and MFU"
  $PY scripts/benchmark_train.py --config configs/gpu_100m.py --steps 20 2>&1 | tee "$RESULTS/gpu_100m.txt"
  $PY scripts/benchmark_train.py --config configs/gpu_100m.py --steps 20 --config.model.remat=none 2>&1 \
    | tee "$RESULTS/gpu_100m_no_remat.txt"
fi

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

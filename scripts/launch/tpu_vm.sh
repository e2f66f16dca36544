#!/usr/bin/env bash
# homegen training on a multi-host Cloud TPU slice: the same command on every worker; --distributed makes
# each process call jax.distributed.initialize(), which finds its peers from the TPU VM's metadata.
# Spot or preemptible TPUs get SIGTERM before they are taken: train.py saves at that step and exits 75,
# and running this script again (after recreating the slice) resumes.
#
#   TPU=homegen-v5e ZONE=us-west4-a REPO=https://github.com/YOU/homegen.git RUNS=/mnt/runs \
#       bash scripts/launch/tpu_vm.sh [train.py flags ...]
#
# Change: the accelerator type and runtime version, the zone, and RUNS: a folder every worker sees (a
# Filestore/NFS mount; homegen writes run folders through the local filesystem, not gs:// URLs).
set -euo pipefail
: "${TPU:?set TPU, the slice's name}" "${ZONE:?set ZONE}" "${REPO:?set REPO, the git URL of your homegen}"
RUNS=${RUNS:-/mnt/runs}
CONFIG=${CONFIG:-configs/pages_small.py}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }

gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" > /dev/null 2>&1 || \
  gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="${ACCELERATOR:-v5litepod-16}" \
    --version="${RUNTIME:-v2-alpha-tpuv5-lite}" ${SPOT:+--spot}
ssh_all "test -d homegen || git clone $REPO homegen; cd homegen && python3 -m venv .venv && \
  .venv/bin/pip install -q -e . 'jax[tpu]'"
ssh_all "cd homegen && .venv/bin/python train.py --distributed --config $CONFIG --workdir $RUNS/homegen $*"

#!/usr/bin/env bash
# The main job on the built-in synthetic world: set up, train a small model (train.py simulates the tiny
# world and writes it as an array_record TFDS dataset on first use), then sample a page from the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN="${RUN:-runs/demo}"
.venv/bin/python train.py --config configs/demo.py --workdir "$RUN" --config.train.steps="${STEPS:-600}"
.venv/bin/python serve.py --checkpoint "$RUN" --user u7 --history t1,t5,t9 --context hour=8,device=mobile

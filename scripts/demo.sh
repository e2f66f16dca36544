#!/usr/bin/env bash
# The main job on the built-in synthetic world: set up, simulate, train a small model, sample a page.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN="${RUN:-runs/demo}"
.venv/bin/python scripts/simulate.py --out "$RUN/world" --items 2000 --pages 20000 --requests 100 --eval-requests 50
.venv/bin/python train.py --config configs/demo.py --workdir "$RUN" --config.train.steps="${STEPS:-600}"
.venv/bin/python serve.py --checkpoint "$RUN" --user u7 --history t1,t5,t9 --context hour=8,device=mobile

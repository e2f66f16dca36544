"""The command-line programs, each a module with `main`: `homegen train|serve|evaluate|simulate` (homegen/cli.py)
and the checkout's train.py, serve.py, scripts/evaluate.py and scripts/simulate.py run the same code."""

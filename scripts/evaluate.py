"""Evaluates a checkpoint: `python scripts/evaluate.py ...` is `homegen evaluate ...` (the code:
homegen/commands/evaluate.py)."""

import sys

from homegen.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

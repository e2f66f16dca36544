"""Writes the synthetic world: `python scripts/simulate.py ...` is `homegen simulate ...` (the code:
homegen/commands/simulate.py)."""

import sys

from homegen.commands.simulate import main

if __name__ == "__main__":
    sys.exit(main())

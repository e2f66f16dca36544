"""Serves pages: `python serve.py ...` is `homegen serve ...` (the code: homegen/commands/serve.py)."""

import sys

from homegen.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())

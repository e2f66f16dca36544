"""Prepares page logs with Apache Beam: `python scripts/prepare.py ...` is `homegen prepare ...` (the code:
homegen/commands/prepare.py)."""

import sys

from homegen.commands.prepare import main

if __name__ == "__main__":
    sys.exit(main())

"""`homegen COMMAND ARGS`: the console command installed with the package.

    homegen train --config demo --workdir runs/demo       # a config by name, or a configs/<name>.py file
    homegen serve --checkpoint runs/demo --user u42
    homegen evaluate --checkpoint runs/demo --split validation
    homegen simulate --out world --items 10000
    homegen join --impressions logs --output pages.jsonl    # served pages + outcome events -> page logs
    homegen prepare --logs 'logs/*.jsonl' --data_dir data   # page logs -> training dataset, with Apache Beam

Each command takes the same flags as the checkout's script of that name (`--help` lists them).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "homegen.commands.train",
    "serve": "homegen.commands.serve",
    "evaluate": "homegen.commands.evaluate",
    "simulate": "homegen.commands.simulate",
    "join": "homegen.commands.join",
    "prepare": "homegen.commands.prepare",
}


def main(argv: list[str] | None = None) -> int:
    """Runs the command `argv[0]` with the rest of `argv` (default: the process's arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: homegen {{{','.join(COMMANDS)}}} [flags]   (homegen --help: examples)", file=sys.stderr)
        return 2
    command = importlib.import_module(COMMANDS[argv[0]])
    program = f"homegen {argv[0]}"  # what argparse and absl print as the program's name
    if argv[0] == "train":
        command.run_command([program] + argv[1:])  # absl parses the flags and exits with the run's code
    sys.argv = [program] + argv[1:]
    return command.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

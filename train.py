"""Trains homegen: `python train.py ...` is `homegen train ...` (the code: homegen/commands/train.py)."""

from homegen.commands.train import run_command

if __name__ == "__main__":
    run_command()

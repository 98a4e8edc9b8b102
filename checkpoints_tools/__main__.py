"""Entry point: python -m checkpoints_tools (or torchrun ... -m checkpoints_tools)."""
import sys

from checkpoints_tools.cli import main

if __name__ == "__main__":  # the guard matters: checkpoint writers may spawn worker processes
    sys.exit(main())

"""Entry point: python -m checkpoints_tools (or torchrun ... -m checkpoints_tools).
Bad input: one line on stderr (once per launch under torchrun) and exit status 2."""
import sys

from checkpoints_tools.cli import run_command
from megagsm.errors import exit_on_user_error

if __name__ == "__main__":  # the guard matters: checkpoint writers may spawn worker processes
    sys.exit(exit_on_user_error(run_command))

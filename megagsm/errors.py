"""The one user-error type, and how every entry point turns it into one line and exit status 2.

A `UserError` is input the user can fix (a config field, a data file or row, a path, a checkpoint, a
token id, a layout). Its message is one line naming the field, file, row or value at fault and what
is allowed. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Input the user can fix. The message is one line and names what is at fault."""


class PeerFailedError(UserError):
    """This rank stops because another rank hit a user error (which that rank reports)."""


def _launch_id() -> str:
    """Names one torchrun launch on this node: torchrun's run id is "none" unless --rdzv-id is given
    and MASTER_PORT is often the default 29500, so the launcher agent (every worker's parent) is
    part of it: its pid and start time, which no later launch shares."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/stat", encoding="ascii") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = ""
    return "-".join([os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_PORT", ""),
                     os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), str(parent), started])


def _first_to_report() -> bool:
    """Under torchrun every rank usually hits the same bad input: only one line per launch is shown.
    The first rank on this node to claim the launch's marker file prints; the others stay quiet."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    marker = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"megagsm-error-{os.getuid()}-{_launch_id()}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def report_user_error(error: UserError, prefix: str | Callable[[UserError], str] = "error") -> int:
    """Prints `prefix: message` (one line) on stderr, once per launch; returns the exit status.
    prefix may be a function of the error (e.g. "config error" for ConfigError)."""
    if callable(prefix):
        prefix = prefix(error)
    message = " ".join(str(error).split())  # one line, whatever the message held
    if isinstance(error, PeerFailedError) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return EXIT_USER_ERROR  # the rank that failed prints the cause
    if _first_to_report():
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def exit_on_user_error(main: Callable[[], int | None],
                       prefix: str | Callable[[UserError], str] = "error") -> int:
    """Runs an entry point's main(); a UserError becomes one line on stderr and status 2. Under
    torchrun a failing rank leaves at once (os._exit) so it neither hangs in a collective nor prints
    teardown tracebacks; the launcher then stops the other ranks."""
    try:
        status = main()
    except UserError as e:
        status = report_user_error(e, prefix)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            sys.stderr.flush()
            os._exit(status)
        return status
    return 0 if status is None else int(status)

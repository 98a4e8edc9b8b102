"""Console logging and progress bars that only rank 0 shows.

Other ranks stay quiet except for errors (prefixed with their rank), so a multi-process run prints
one readable log. The rank is checked when a record is emitted, so loggers made at import time,
before the process group exists, still behave.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from .rank import get_rank, is_rank0

__all__ = ["filter_cli_warnings", "get_logger", "progress", "setup_logging"]

_ROOT = "megagsm"
_FORMAT = "%(asctime)s %(levelname)s %(rankprefix)s%(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Let rank 0 through; other ranks only at ERROR and above, tagged with their rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = get_rank()
        record.rankprefix = "" if rank == 0 else f"[rank {rank}] "
        return rank == 0 or record.levelno >= logging.ERROR


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm so log lines do not tear an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(level: int | str | None = None) -> logging.Logger:
    """Attach the console handler to the 'megagsm' logger (once) and set its level:
    `level`, else $MEGAGSM_LOG_LEVEL, else INFO."""
    root = logging.getLogger(_ROOT)
    level = level if level is not None else os.environ.get("MEGAGSM_LOG_LEVEL", "INFO")
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if not _has_handler(root):
        handler = _TqdmHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        # propagate stays on: pytest's caplog listens on the root logger, which has no handler of ours
    return root


def get_logger(name: str) -> logging.Logger:
    """A logger under 'megagsm' (module names like 'megagsm.sft.trainer' are used as they are)."""
    if not _has_handler(logging.getLogger(_ROOT)):
        setup_logging()
    if name != _ROOT and not name.startswith(_ROOT + "."):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def _has_handler(logger: logging.Logger) -> bool:
    return any(isinstance(h, _TqdmHandler) for h in logger.handlers)


def progress(iterable: Iterable[Any] | int | None = None, desc: str | None = None, *,
             total: int | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on rank 0, a silent pass-through elsewhere. An int stands for `total` (use .update()).

    On a TTY the bar redraws often; in a log file (CI) it prints a line at most every 30 s.
    """
    if isinstance(iterable, int):
        iterable, total = None, iterable
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    disable = kwargs.pop("disable", False) or not is_rank0()
    return tqdm(iterable, desc=desc, total=total, disable=disable, **kwargs)


def filter_cli_warnings() -> None:
    """Silences the warnings a command-line user cannot act on (the converter CLI and
    launch/generate.py share this list): deprecations inside torch/megatron/transformers, and
    megatron's import-time notes that transformer-engine / apex are absent (megagsm's own layers
    stand in for them) or that ShardedTensor is deprecated."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    warnings.filterwarnings("ignore", message=".*ShardedTensor.*")

"""Training metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard, plotted to PNG.

A row is a flat mapping with a "phase" (e.g. "train", "eval", "rollout") and a "step"; every other
numeric value is a metric. Only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from collections.abc import Mapping
from typing import Any

from .rank import is_rank0

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_NOT_METRICS = ("phase", "step", "time")


def to_python(value: Any) -> Any:
    """Tensors and numpy values -> python numbers (or lists for several elements); others unchanged."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value


class MetricsWriter:
    """Appends rows to <out_dir>/metrics.jsonl (flushed per row) and scalars to <out_dir>/tensorboard.

    On ranks other than 0 every method does nothing, so callers need no rank checks.
    """

    def __init__(self, out_dir: str, tensorboard: bool = True):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, METRICS_FILE)
        self._file = None
        self._tb = None
        if not is_rank0():
            return
        os.makedirs(out_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # append: a resumed run keeps its history
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only where it is used

            self._tb = SummaryWriter(log_dir=os.path.join(out_dir, TENSORBOARD_DIR))

    def log(self, phase: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one row: {"phase": phase, "step": step, "time": now, **metrics}."""
        self.write({"phase": phase, "step": step, **metrics})

    def write(self, row: Mapping[str, Any]) -> None:
        """Write one row; it must hold "phase" and "step". "time" (unix seconds) is added if absent."""
        if self._file is None:
            return
        if "phase" not in row or "step" not in row:
            raise ValueError(f"a metrics row needs 'phase' and 'step', got keys {sorted(row)}")
        clean = {str(k): to_python(v) for k, v in row.items()}
        clean.setdefault("time", time.time())
        self._file.write(json.dumps(clean, default=str) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(clean["step"])
            for key, value in clean.items():
                if key not in _NOT_METRICS and _is_scalar(value):
                    self._tb.add_scalar(f"{clean['phase']}/{key}", value, global_step=step)
            self._tb.flush()

    def rewind(self, step: int) -> int:
        """Drop the rows after `step` (and a torn last line): a run resumed from the checkpoint of
        `step` logs the later steps again, so the history stays one row per step; step=-1 drops every
        row (a fresh run in a used output_dir). TensorBoard hides the dropped steps (purge_step).
        Atomic: the kept rows go to a temp file renamed over metrics.jsonl. Returns the rows dropped."""
        if self._file is None:
            return 0
        self._file.close()
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and int(row.get("step", 0)) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            from .atomic import write_text_atomic  # imports torch: only when rewriting

            write_text_atomic(self.path, "".join(kept))
            logging.getLogger(__name__).info("%s: dropped %d rows logged after step %d by an earlier launch",
                                             self.path, len(lines) - len(kept), step)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(log_dir=os.path.join(self.out_dir, TENSORBOARD_DIR),
                                     purge_step=max(step + 1, 0))
        return len(lines) - len(kept)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(jsonl_path: str, phase: str | None = None) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, optionally only one phase. A torn last line (crash) is skipped."""
    rows = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if phase is None or row.get("phase") == phase:
                rows.append(row)
    return rows


def _is_scalar(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))

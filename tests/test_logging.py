"""Rank-0 console logging, progress bars, metrics JSONL + TensorBoard, and PNG plots."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch

from megagsm.utils.logging import get_logger, progress
from megagsm.utils.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, read_metrics, to_python
from megagsm.utils.plots import plot_metrics
from megagsm.utils.rank import get_rank

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def rank(monkeypatch):
    """Set this process's rank through env RANK (no process group in these tests)."""
    def set_rank(r: int) -> None:
        monkeypatch.setenv("RANK", str(r))
    set_rank(0)
    return set_rank


def test_rank_from_env(rank):
    assert get_rank() == 0
    rank(3)
    assert get_rank() == 3


def test_to_python_converts_tensors_and_numpy():
    out = to_python({"a": torch.tensor(1.5), "b": np.float32(0.5), "c": np.int64(7), "d": torch.arange(3),
                     "e": [torch.tensor(2)], "f": "text"})
    assert out == {"a": 1.5, "b": 0.5, "c": 7, "d": [0, 1, 2], "e": [2], "f": "text"}
    assert type(out["a"]) is float and type(out["b"]) is float and type(out["c"]) is int


def test_metrics_jsonl_rows_flushed_and_appended(tmp_path, rank):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.log("train", 1, {"loss": torch.tensor(2.5), "lr": np.float64(1e-3), "tokens": np.int64(64)})
    # readable before close: each row is flushed
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert rows[0]["phase"] == "train" and rows[0]["step"] == 1
    assert rows[0]["loss"] == 2.5 and rows[0]["lr"] == 1e-3 and rows[0]["tokens"] == 64
    assert isinstance(rows[0]["time"], float)
    writer.write({"phase": "eval", "step": 1, "accuracy": 0.25, "time": 5.0})
    writer.close()
    with MetricsWriter(str(tmp_path), tensorboard=False) as again:  # a resumed run appends
        again.log("train", 2, {"loss": 1.5})
    rows = read_metrics(str(tmp_path / METRICS_FILE))
    assert [(r["phase"], r["step"]) for r in rows] == [("train", 1), ("eval", 1), ("train", 2)]
    assert rows[1]["time"] == 5.0
    assert [r["loss"] for r in read_metrics(str(tmp_path / METRICS_FILE), phase="train")] == [2.5, 1.5]


def test_row_without_phase_or_step_is_rejected(tmp_path, rank):
    with MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'phase' and 'step'"):
            writer.write({"step": 1, "loss": 1.0})


def test_read_metrics_skips_torn_last_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"phase": "train", "step": 0, "loss": 1.0}\n{"phase": "tr')
    assert read_metrics(str(path)) == [{"phase": "train", "step": 0, "loss": 1.0}]


def test_tensorboard_mirrors_scalars(tmp_path, rank):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(str(tmp_path)) as writer:
        for step in range(3):
            writer.log("train", step, {"loss": torch.tensor(1.0 / (step + 1)), "note": "text", "ok": True})
        writer.log("eval", 2, {"accuracy": np.float32(0.5)})
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/accuracy", "train/loss"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    assert events.Scalars("eval/accuracy")[0].value == pytest.approx(0.5)


def test_rewind_drops_rows_after_the_resumed_step(tmp_path, rank):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(str(tmp_path)) as first:  # a launch that died after logging step 4
        for step in range(1, 5):
            first.log("sft", step, {"loss": float(step)})
        first.log("eval", 2, {"accuracy": 0.5})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"phase": "sft", "st')  # torn by the crash
    with MetricsWriter(str(tmp_path)) as resumed:  # resumed from the checkpoint of step 2
        assert resumed.rewind(2) == 3
        for step in (3, 4, 5):
            resumed.log("sft", step, {"loss": 10.0 + step})
    rows = read_metrics(str(tmp_path / METRICS_FILE))
    assert [(r["phase"], r["step"]) for r in rows] == [("sft", 1), ("sft", 2), ("eval", 2), ("sft", 3),
                                                      ("sft", 4), ("sft", 5)]
    assert [r["loss"] for r in rows if r["phase"] == "sft"] == [1.0, 2.0, 13.0, 14.0, 15.0]
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("sft/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0),
                                                                     (5, 15.0)]
    with MetricsWriter(str(tmp_path), tensorboard=False) as fresh:  # a new run in the same directory
        assert fresh.rewind(-1) == 6
    assert read_metrics(str(tmp_path / METRICS_FILE)) == []


def test_only_rank0_writes(tmp_path, rank):
    rank(1)
    with MetricsWriter(str(tmp_path / "out")) as writer:
        writer.log("train", 0, {"loss": 1.0})
    assert not (tmp_path / "out").exists()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_metrics_writes_png(tmp_path):
    import matplotlib.image

    rows = [{"phase": "train", "step": s, "loss": 1.0 / (s + 1)} for s in range(10)]
    rows += [{"phase": "eval", "step": s, "loss": 2.0 / (s + 1), "accuracy": s / 10} for s in (0, 5, 9)]
    write_rows(tmp_path / METRICS_FILE, rows)
    png = tmp_path / "plots" / "curves.png"
    assert plot_metrics(str(tmp_path / METRICS_FILE), str(png), ["loss", "accuracy", "absent"]) == str(png)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert list(png.parent.iterdir()) == [png]  # temp file renamed away


def test_plot_metrics_filters_phase_and_x_axis(tmp_path):
    rows = [{"phase": "rollout", "step": s, "time": 100.0 + s, "reward": s % 3} for s in range(5)]
    write_rows(tmp_path / METRICS_FILE, rows)
    png = tmp_path / "reward.png"
    plot_metrics(str(tmp_path / METRICS_FILE), str(png), ["reward"], by="time", phase="rollout")
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_progress_shows_only_on_rank0(rank):
    bar = progress(range(3), "steps", file=io.StringIO())
    assert not bar.disable and list(bar) == [0, 1, 2]
    counter = progress(5, desc="tokens", file=io.StringIO())
    assert counter.total == 5 and not counter.disable
    counter.update(5)
    counter.close()
    rank(1)
    quiet = progress(range(3), "steps", file=io.StringIO())
    assert quiet.disable and list(quiet) == [0, 1, 2]


@pytest.fixture
def console(rank):
    """The megagsm console handler, writing into a buffer for the test."""
    log = get_logger("tests.console")
    handler = next(h for h in logging.getLogger("megagsm").handlers if h.filters)
    buffer = io.StringIO()
    old = handler.setStream(buffer)
    yield log, buffer
    handler.setStream(old)


def test_logger_is_rank0_only_except_errors(console, rank):
    log, buffer = console
    assert log.name == "megagsm.tests.console"
    log.info("hello from rank zero")
    rank(1)
    log.info("info from rank one")
    log.warning("warning from rank one")
    log.error("error from rank one")
    text = buffer.getvalue()
    assert "hello from rank zero" in text
    assert "rank one" in text and "info from rank one" not in text and "warning from rank one" not in text
    assert "[rank 1] megagsm.tests.console: error from rank one" in text


def test_module_logger_names_are_kept():
    assert get_logger("megagsm.sft.trainer").name == "megagsm.sft.trainer"

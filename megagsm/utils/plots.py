"""Training curves people can read: one panel per metric, labelled with what it measures and its unit.

`plot_metrics(jsonl, png, keys, phase=...)` draws each key of a metrics.jsonl against the step:
  * a figure title with the run (the output dir's name), the model and the layout, read from the
    config.yaml the trainer saved beside metrics.jsonl (or given as `title`);
  * y-labels with units (nats/token, tokens, %, s); fractions in [0, 1] drawn as percentages;
  * losses on a log axis (a loss falls by orders of magnitude: a linear axis is flat after the start);
  * the raw points faint, an exponential moving average over them (`smoothing`) solid;
  * "held-out greedy accuracy (N problems)" when N is known (`counts={"accuracy": N}`, or an
    `eval_examples` / `accuracy_n` value in the rows);
  * one panel for keys whose series are identical (e.g. reward_mean and rollout_accuracy under 0/1
    rewards), titled with both names.
Written atomically (temp file renamed into place) with the umask's file mode.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .metrics import read_metrics


@dataclass(frozen=True)
class Label:
    text: str               # what the number measures
    unit: str = ""          # shown in brackets on the y axis
    percent: bool = False   # a fraction drawn as %
    log: bool = False       # log-scale y axis


LABELS: dict[str, Label] = {
    "loss": Label("training loss", "nats/token", log=True),
    "val_loss": Label("validation loss", "nats/token", log=True),
    "accuracy": Label("held-out greedy accuracy", "%", percent=True),
    "rollout_accuracy": Label("rollout accuracy (sampled)", "%", percent=True),
    "reward_mean": Label("mean reward per rollout", "reward"),
    "reward_std": Label("reward std within groups", "reward"),
    "response_length": Label("mean response length", "tokens"),
    "response_length_max": Label("longest response", "tokens"),
    "entropy": Label("policy entropy", "nats/token"),
    "approx_kl_k3": Label("KL to the rollout policy (k3)", "nats"),
    "pg_clipfrac": Label("clipped fraction", "%", percent=True),
    "zero_std_fraction": Label("groups with equal rewards", "%", percent=True),
    "truncated_fraction": Label("truncated responses", "%", percent=True),
    "grad_norm": Label("gradient norm", "L2"),
    "lr": Label("learning rate", "1/step"),
    "tokens": Label("tokens per step", "tokens"),
    "tokens_per_s": Label("throughput", "tokens/s"),
    "gen_tokens_per_s": Label("generation throughput", "tokens/s"),
    "step_time": Label("step time", "s"),
}
# keys whose value is a count of held-out problems, per accuracy row
COUNT_KEYS = ("eval_examples", "accuracy_n", "eval_n")


def label_for(key: str, labels: Mapping[str, Label | str] | None = None) -> Label:
    given = (labels or {}).get(key)
    if isinstance(given, Label):
        return given
    base = LABELS.get(key)
    if base is None:
        unit = "s" if key.startswith("time_") else ""
        base = Label(key.replace("_", " "), unit)
    return Label(given, base.unit, base.percent, base.log) if isinstance(given, str) else base


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Exponential moving average, bias-corrected (the first points are not pulled to 0)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = smoothing * avg + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out.append(avg / weight)
    return out


def _is_scalar(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _series(rows, key: str, by: str) -> list[tuple[float, float]]:
    return sorted((r[by], r[key]) for r in rows if _is_scalar(r.get(key)) and _is_scalar(r.get(by)))


def merge_identical(keys: Sequence[str], series: Mapping[str, list]) -> list[list[str]]:
    """Groups of keys with the same (x, y) points; a key with no points stays on its own."""
    groups: list[list[str]] = []
    for key in keys:
        for group in groups:
            if series[key] and series[group[0]] == series[key]:
                group.append(key)
                break
        else:
            groups.append([key])
    return groups


def run_title(jsonl_path: str) -> str:
    """'<run> - <model> - <layout>' from the config.yaml beside metrics.jsonl (what is known)."""
    directory = os.path.dirname(os.path.abspath(jsonl_path))
    parts = [os.path.basename(directory)]
    path = os.path.join(directory, "config.yaml")
    if os.path.isfile(path):
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(path)
            model = OmegaConf.select(cfg, "model.hf_dir") or OmegaConf.select(cfg, "model.family")
            if model:
                parts.append(os.path.basename(str(model).rstrip("/")))
            p = OmegaConf.select(cfg, "parallel") or {}
            layout = " ".join(f"{k.upper()}{p.get(k)}" for k in ("tp", "pp", "ep", "cp")
                              if isinstance(p.get(k), int) and p.get(k) > 1)
            world = p.get("world_size")
            if isinstance(world, int) and world > 0:
                layout = (layout + f" on {world} processes").strip()
            parts.append(layout or "no model parallelism")
            algorithm = OmegaConf.select(cfg, "algorithm.name")
            if algorithm:
                parts.insert(1, str(algorithm).upper())
        except Exception:  # noqa: BLE001 - a title is not worth failing a run for
            pass
    return " - ".join(parts)


def _count(rows, key: str, counts: Mapping[str, int] | None) -> int | None:
    if counts and key in counts:
        return int(counts[key])
    for r in reversed(rows):
        if _is_scalar(r.get(key)):
            for c in COUNT_KEYS:
                if _is_scalar(r.get(c)):
                    return int(r[c])
    return None


def panels(rows, keys: Sequence[str], by: str = "step", labels: Mapping[str, Label | str] | None = None,
           counts: Mapping[str, int] | None = None) -> list[tuple[list[str], str, Label]]:
    """(keys drawn, panel title, label of the first key) per panel, identical series merged."""
    series = {k: _series(rows, k, by) for k in keys}
    out = []
    for group in merge_identical(list(keys), series):
        key = group[0]
        label = label_for(key, labels)
        n = _count(rows, key, counts)
        text = f"{label.text} ({n} problems)" if n is not None and key == "accuracy" else label.text
        if len(group) > 1:
            text += "  =  " + " = ".join(label_for(k, labels).text for k in group[1:]) + " (identical)"
        out.append((group, text, label))
    return out


def plot_metrics(jsonl_path: str, png_path: str, keys: Sequence[str], by: str = "step",
                 phase: str | None = None, *, title: str | None = None,
                 labels: Mapping[str, Label | str] | None = None, counts: Mapping[str, int] | None = None,
                 smoothing: float = 0.9) -> str:
    """Draws `keys` of metrics.jsonl against `by` (one line per phase) into `png_path`; returns it.
    labels: per key a Label or a text; counts: per key the number of held-out problems."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the process's backend alone

    rows = read_metrics(jsonl_path, phase)
    phases = sorted({str(r.get("phase")) for r in rows})
    layout = panels(rows, keys, by, labels, counts)
    fig = Figure(figsize=(8, 2.8 * max(1, len(layout)) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title or run_title(jsonl_path), fontsize="large")
    axes = fig.subplots(max(1, len(layout)), 1, squeeze=False)[:, 0]
    for ax, (group, text, label) in zip(axes, layout):
        key = group[0]
        drawn = 0
        for ph in phases:
            points = _series([r for r in rows if str(r.get("phase")) == ph], key, by)
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [y * 100 if label.percent else y for _, y in points]
            many = len(points) >= 20
            line = ax.plot(xs, ys, marker="." if not many else None, alpha=0.3 if many else 1.0,
                           linewidth=0.8, label=f"{ph} (raw)" if many else ph)[0]
            if many:
                ax.plot(xs, ema(ys, smoothing), color=line.get_color(), linewidth=1.8,
                        label=f"{ph} (EMA {smoothing})")
            drawn += 1
            if label.log and min(ys) > 0:
                ax.set_yscale("log")
        if drawn:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(text, fontsize="medium")
        ax.set_ylabel(f"{label.unit}" if label.unit else key)
        ax.set_xlabel(by)
        ax.grid(True, alpha=0.3, which="both")
    return _save(fig, png_path)


def _save(fig, png_path: str) -> str:
    import tempfile

    from .atomic import umask_mode

    directory = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".plot-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.chmod(tmp, umask_mode(directory=False))
        os.replace(tmp, png_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return png_path

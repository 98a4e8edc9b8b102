"""The GSPO phase of `make demo` (called by megagsm.demo after its SFT phase).

`torchrun --nproc-per-node 2 launch/train.py --config launch/recipes/gspo_demo_cpu.yaml` starting from
the SFT run's newest checkpoint (model.load), on the same synthetic data, tokenizer and model shape.
Writes <root>/gspo/: metrics.jsonl (phase "gspo": step, reward_mean, accuracy, ...), gspo_metrics.png,
reward_curve.png (mean reward per step and held-out accuracy) and checkpoints/.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

RECIPE = Path(__file__).resolve().parents[2] / "launch" / "recipes" / "gspo_demo_cpu.yaml"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(metrics_path: str, window: int = 5) -> dict:
    """Held-out accuracy at the first and last evaluation, mean reward over the first and last
    `window` steps (one step's reward is a noisy estimate)."""
    from megagsm.utils.metrics import read_metrics

    rows = sorted(read_metrics(metrics_path, "gspo"), key=lambda r: r["step"])
    acc = [r for r in rows if "accuracy" in r]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    return {"accuracy_before": acc[0]["accuracy"] if acc else None,
            "accuracy_after": acc[-1]["accuracy"] if acc else None,
            "reward_first": _mean(rewards[:window]), "reward_last": _mean(rewards[-window:]),
            "steps": len(rewards)}


def plot_reward_curve(metrics_path: str, png_path: str) -> str:
    from megagsm.utils.metrics import plot_metrics

    return plot_metrics(metrics_path, png_path, ["reward_mean", "accuracy"], phase="gspo")


def run_phase(root: Path, inputs: dict, sft_dir: Path, nproc: int, torchrun: Callable[..., int],
              overrides: list[str] = ()) -> tuple[int, dict]:
    """Runs the GSPO phase; returns (exit code, summary)."""
    gspo_dir = root / "gspo"
    args = [f"model.hf_dir={inputs['base']}", f"model.load={sft_dir / 'checkpoints'}",
            f"data.train_path={inputs['train']}", f"data.eval_path={inputs['test']}",
            f"train.output_dir={gspo_dir}", *overrides]
    rc = torchrun(nproc, RECIPE, args)
    metrics = gspo_dir / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        return rc or 1, {}
    summary = summarize(str(metrics))
    summary["reward_curve"] = plot_reward_curve(str(metrics), str(gspo_dir / "reward_curve.png"))
    summary["metrics"] = str(metrics)
    summary["checkpoints"] = os.path.join(gspo_dir, "checkpoints")
    return 0, summary

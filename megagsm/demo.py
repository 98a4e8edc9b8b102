"""`make demo`: the user's path on a tiny model, on CPU, 2 processes: synthetic GSM8K -> verl's parquet
layout -> SFT -> GSPO from the SFT model -> evaluation -> HF export. Each step prints its command.

Outputs under runs/demo/:
1. data/{train,test}.jsonl: synthetic GSM8K-format problems (megagsm.data.synthetic), then
   verl/{train,test}.parquet: the same rows in verl's RL layout (`python -m megagsm.data.prepare gsm8k`),
2. base/: a byte-level BPE tokenizer trained on them (digits split one per token) and the config.json
   of a tiny Qwen2-shaped model sized to it (random weights: model.init=random),
3. sft/: `torchrun --nproc-per-node 2 launch/train.py --config launch/recipes/sft_demo_cpu.yaml` on the
   parquet files with verl's SFT keys (extra_info.question / extra_info.answer), TP=2 + SP:
   metrics.jsonl (phase "sft": step, loss, val_loss, accuracy), sft_metrics.png, checkpoints/, hf/,
4. gspo/: GSPO from the SFT checkpoint, same model, 2 processes (launch/recipes/gspo_demo_cpu.yaml):
   metrics.jsonl (phase "gspo": step, reward_mean, accuracy, ...), reward_curve.png, checkpoints/, hf/,
5. eval.jsonl: `python -m megagsm.eval` of the GSPO checkpoint on verl/test.parquet,
6. prints the held-out accuracy (greedy decoding, exact final answer) before and after SFT and GSPO,
   the mean rollout reward at the start and end of GSPO, and where the HF exports are.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "launch" / "recipes" / "sft_demo_cpu.yaml"
GSPO_RECIPE = REPO / "launch" / "recipes" / "gspo_demo_cpu.yaml"
TRAIN_SCRIPT = REPO / "launch" / "train.py"


# Qwen2Config sizes: the demo's model, and the tiny one the tests train
DEMO_MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, max_position_embeddings=128)
TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64)


@dataclass(frozen=True)
class DemoSpec:
    """The synthetic task, tokenizer and model shape (the recipe holds the training settings)."""

    level: int = 0              # synthetic difficulty: one addition of two numbers below 100
    n_train: int = 5000
    n_test: int = 100
    seed: int = 0
    tokenizer_vocab: int = 256  # upper bound; BPE stops when the corpus has no more merges
    model: dict = field(default_factory=lambda: dict(DEMO_MODEL))  # Qwen2Config sizes
    vocab_multiple: int = 64    # the model's vocab is rounded up (megatron splits it over TP ranks)


def build_base(base: str | os.PathLike, texts: list[str], spec: DemoSpec = DemoSpec()) -> int:
    """A weightless HF model dir: a tokenizer trained on `texts` and the config.json of a tiny
    Qwen2-shaped model sized to it (model.init=random builds it). Returns the tokenizer's size."""
    from transformers import Qwen2Config

    from megagsm.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, spec.tokenizer_vocab, base)
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // spec.vocab_multiple) * spec.vocab_multiple, **spec.model,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(str(base))
    return len(tokenizer)


def prepare_inputs(root: str | os.PathLike, spec: DemoSpec = DemoSpec(), template: str = "bare") -> dict:
    """Writes data/ (synthetic problems) and base/ (tokenizer + config.json) under root."""
    from megagsm.data.gsm8k import load_gsm8k
    from megagsm.data.prompts import build_prompt
    from megagsm.data.synthetic import write_synthetic_dataset

    root = Path(root)
    train_path, test_path = write_synthetic_dataset(root / "data", spec.n_train, spec.n_test, spec.level, spec.seed)
    # the tokenizer sees text exactly as training renders it: prompt (plain template) + solution
    texts = [build_prompt(row.question, None, template) + row.answer for row in load_gsm8k(str(train_path))]
    size = build_base(root / "base", texts, spec)
    return {"train": str(train_path), "test": str(test_path), "base": str(root / "base"), "tokenizer_size": size}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # torch/megatron deprecation notices from inside their own collectives: noise in a demo's output
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning,ignore::DeprecationWarning")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_command(args: list[str]) -> int:
    """Runs `python ARGS` from the repository root, printing the command as a user would type it."""
    shown = ["torchrun"] + args[3:] if args[:2] == ["-m", "torch.distributed.run"] else ["python"] + args
    print("$", " ".join(shown), flush=True)
    return subprocess.call([sys.executable, *args], env=_env(), cwd=str(REPO))


def torchrun(nproc: int, recipe: Path, overrides: list[str]) -> int:
    return run_command(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        str(TRAIN_SCRIPT.relative_to(REPO)), "--config", str(recipe.relative_to(REPO)), *overrides])


def accuracy_before_after(metrics_path: str, phase: str) -> tuple[float | None, float | None]:
    from megagsm.utils.metrics import read_metrics

    rows = [r for r in read_metrics(metrics_path, phase) if "accuracy" in r]
    if not rows:
        return None, None
    rows.sort(key=lambda r: r["step"])
    return rows[0]["accuracy"], rows[-1]["accuracy"]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_gspo(metrics_path: str, window: int = 5) -> dict:
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


def run_gspo_phase(root: Path, inputs: dict, sft_dir: Path, nproc: int, overrides: list[str] = ()) -> tuple[int, dict]:
    """GSPO from the SFT run's newest checkpoint (model.load), same data, tokenizer and model shape.
    Returns (exit code, summary)."""
    from megagsm.utils.plots import plot_metrics

    gspo_dir = root / "gspo"
    args = [f"model.hf_dir={inputs['base']}", f"model.load={sft_dir / 'checkpoints'}", *_data_args(inputs),
            f"train.output_dir={gspo_dir}", *overrides]
    rc = torchrun(nproc, GSPO_RECIPE, args)
    metrics = gspo_dir / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        return rc or 1, {}
    summary = summarize_gspo(str(metrics))
    summary["reward_curve"] = plot_metrics(str(metrics), str(gspo_dir / "reward_curve.png"),
                                           ["reward_mean", "accuracy"], phase="gspo")
    summary["metrics"] = str(metrics)
    return 0, summary


def _data_args(inputs: dict) -> list[str]:
    """The verl parquet files with verl's SFT keys: the question goes through the recipe's template."""
    return ["data.source=parquet", f"data.train_path={inputs['verl_train']}", f"data.eval_path={inputs['verl_test']}",
            "data.prompt_key=extra_info.question", "data.answer_key=extra_info.answer"]


def prepare_verl_layout(root: Path, inputs: dict) -> int:
    """`python -m megagsm.data.prepare gsm8k`: the synthetic jsonl files -> verl's train/test.parquet."""
    verl = root / "verl"
    inputs.update(verl_train=str(verl / "train.parquet"), verl_test=str(verl / "test.parquet"))
    return run_command(["-m", "megagsm.data.prepare", "gsm8k", "--input", str(Path(inputs["train"]).parent),
                        "--out", str(verl), "--overwrite"])


def evaluate_checkpoint(checkpoints: Path, inputs: dict, out: Path) -> dict | None:
    """`python -m megagsm.eval` on the held-out parquet file; its summary line."""
    import json

    rc = run_command(["-m", "megagsm.eval", "--load", str(checkpoints), "--data", inputs["verl_test"],
                      "--prompt-key", "extra_info.question", "--template", "bare", "--max-new-tokens", "20",
                      "--max-prompt-len", "40", "--output", str(out)])
    if rc != 0 or not out.exists():
        return None
    return json.loads(out.read_text().strip().splitlines()[-1])


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megagsm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2: TP=2)")
    parser.add_argument("--keep", action="store_true", help="keep a previous run's checkpoints (resume)")
    parser.add_argument("--no-gspo", action="store_true", help="stop after the SFT phase")
    parser.add_argument("--gspo", action="append", default=[], metavar="section.field=value",
                        help="an override for the GSPO run (repeatable)")
    parser.add_argument("overrides", nargs="*", help="extra section.field=value overrides for the SFT run")
    args = parser.parse_args(argv)

    started = time.time()
    root = Path(args.root) if os.path.isabs(args.root) else REPO / args.root
    sft_dir = root / "sft"
    for phase_dir in (sft_dir, root / "gspo"):
        if phase_dir.exists() and not args.keep:
            shutil.rmtree(phase_dir)
    total = 3 if args.no_gspo else 5
    print(f"[demo] 1/{total} synthetic GSM8K -> verl's parquet layout, tokenizer + model config under {root}",
          flush=True)
    inputs = prepare_inputs(root)
    if prepare_verl_layout(root, inputs) != 0:
        print("[demo] data preparation failed", file=sys.stderr)
        return 1
    print(f"[demo]     tokenizer: {inputs['tokenizer_size']} tokens; data: {inputs['verl_train']}", flush=True)
    print(f"[demo] 2/{total} SFT: tiny Qwen2-shaped model, random init, TP=2 on 2 processes", flush=True)
    overrides = [f"model.hf_dir={inputs['base']}", *_data_args(inputs), f"train.output_dir={sft_dir}",
                 *args.overrides]
    rc = torchrun(args.nproc, SFT_RECIPE, overrides)
    if rc != 0:
        print(f"[demo] SFT failed (exit {rc})", file=sys.stderr)
        return rc
    before, after = accuracy_before_after(str(sft_dir / "metrics.jsonl"), "sft")
    gspo = {}
    if not args.no_gspo:
        print(f"[demo] 3/{total} GSPO from the SFT checkpoint: same model, rollouts sampled in-process, "
              "2 processes (data parallel)", flush=True)
        rc, gspo = run_gspo_phase(root, inputs, sft_dir, args.nproc, args.gspo)
        if rc != 0:
            print(f"[demo] GSPO failed (exit {rc})", file=sys.stderr)
            return rc
        print(f"[demo] 4/{total} evaluation of the GSPO checkpoint on the held-out parquet file", flush=True)
        gspo["eval"] = evaluate_checkpoint(root / "gspo" / "checkpoints", inputs, root / "eval.jsonl")
        if gspo["eval"] is None:
            print("[demo] evaluation failed", file=sys.stderr)
            return 1
    print(f"[demo] {total}/{total} results", flush=True)
    print(f"[demo]   held-out accuracy (greedy, exact answer): before SFT {_fmt(before)}, after SFT {_fmt(after)}")
    print(f"[demo]   metrics: {sft_dir / 'metrics.jsonl'}  plot: {sft_dir / 'sft_metrics.png'}")
    print(f"[demo]   checkpoints: {sft_dir / 'checkpoints'}"
          + (f"  HF export: {sft_dir / 'hf'}" if (sft_dir / "hf").exists() else "  (HF export skipped)"))
    if gspo:
        print(f"[demo]   GSPO ({gspo['steps']} steps): held-out accuracy {_fmt(gspo['accuracy_before'])} -> "
              f"{_fmt(gspo['accuracy_after'])}; mean rollout reward (first / last 5 steps) "
              f"{gspo['reward_first']:.3f} -> {gspo['reward_last']:.3f}")
        print(f"[demo]   metrics: {gspo['metrics']}  reward curve: {gspo['reward_curve']}")
        print(f"[demo]   python -m megagsm.eval: accuracy {_fmt(gspo['eval']['accuracy'])} on "
              f"{gspo['eval']['num_prompts']} held-out problems ({root / 'eval.jsonl'})")
        if (root / "gspo" / "hf").exists():
            print(f"[demo]   HF export of the GSPO model: {root / 'gspo' / 'hf'} "
                  "(AutoModelForCausalLM.from_pretrained loads it)")
    print(f"[demo] done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

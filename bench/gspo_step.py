"""One GSPO step, timed by phase: generate / score / old log-probs / update, against today's padded, static path.

    python bench/gspo_step.py                         # ~20M Qwen2-shaped model, CPU, fp32, 1 process
    python bench/gspo_step.py --shape qwen2.5-0.5b    # Qwen2.5-0.5B-shaped (random weights; GPU: bf16)
    python bench/gspo_step.py --lengths skewed --new-tokens 512    # long-tailed response lengths
    python bench/gspo_step.py --hf-dir runs/demo/sft/hf --data runs/demo/data/train.jsonl --template bare \
        --prompts 64 --n 8 --new-tokens 20 --max-prompt-len 40 --vs-trl    # the demo's model vs TRL

The step is `megagsm.rl.gspo.GSPO.train_step`, the trainer's own: in-process sampling of `--prompts` x
`--n` rollouts with the trainer's weights, GSM8K scoring, group advantages, the old log-prob pass (skipped
when exactly on-policy) and `--mini-batches` optimizer steps through megatron's schedules.

Model: `--hf-dir` (an HF model dir, converted as model.init=hf does), `--load` (a megagsm checkpoint), or
random weights of `--shape` on a BPE tokenizer trained on synthetic GSM8K problems (megagsm.demo). Data:
`--data` (a parquet/jsonl file read as the trainer reads data.train_path) or those synthetic problems;
`--template` as data.prompt_template. Lengths: `fixed` runs every rollout until EOS or `--new-tokens`
(random weights rarely sample EOS); `skewed` stops each rollout with EOS after a length drawn from a long
tail (median ~1/4 of the cap, ~5% at the cap) through the engine's `response_lengths`. Group filtering is off,
so every rollout is trained on.

Two paths in one run (bench/gspo_paths.py): the trainer's defaults, and the baseline (today's padded rows,
`train.max_tokens_per_microbatch=0`, and static batching, `generation.continuous_batching=false`: each set
where the config has the field). Each round, each path generates its own rollouts (its generate time),
then both train on the same rollouts. One warm-up round, then `--steps` rounds; each path's fastest round
is reported. `--vs-trl` alternates every round with one step of TRL's GRPOTrainer as GSPO
(bench/gspo_trl.py, in its own process) on the same HF weights, prompts and shapes. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # name: (hidden, layers, heads, kv heads, ffn, vocab, tied embeddings)
    "20m": (512, 4, 8, 2, 1536, 8192, False),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="20m", help="random weights of this shape "
                    "(without --hf-dir / --load)")
    ap.add_argument("--hf-dir", help="HF model dir (weights, config, tokenizer)")
    ap.add_argument("--load", help="megagsm checkpoint (dir or iter_*); architecture from its hf/ unless --hf-dir")
    ap.add_argument("--data", help="GSM8K-style .parquet / .jsonl (default: synthetic problems)")
    ap.add_argument("--prompt-key", help="data.prompt_key (default: the trainer's)")
    ap.add_argument("--answer-key", help="data.answer_key (default: the trainer's)")
    ap.add_argument("--template", default="bare", help="data.prompt_template")
    ap.add_argument("--lengths", choices=["fixed", "skewed"], default="fixed")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--mini-batches", type=int, default=1)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--gen-batch", type=int, default=64, help="sequences decoded together")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=2, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--two-pass", action="store_true",
                    help="run the old-log-prob pass even when exactly on-policy (mini-batches 1, one epoch): "
                         "the baseline of the on-policy skip")
    ap.add_argument("--override", action="append", default=[], metavar="section.field=value",
                    help="a config override for both paths (repeatable)")
    ap.add_argument("--vs-trl", action="store_true", help="TRL's GRPOTrainer (GSPO) on the same model, interleaved")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with trl installed, for --vs-trl")
    args = ap.parse_args(argv)
    if args.vs_trl and not args.hf_dir:
        ap.error("--vs-trl needs --hf-dir: TRL loads the same HF weights")
    if args.vs_trl and args.lengths != "fixed":
        ap.error("--vs-trl needs --lengths fixed: TRL's generation has no forced lengths")
    if args.vs_trl and args.mini_batches != 1:
        ap.error("--vs-trl needs --mini-batches 1: TRL takes one optimizer step per generation here")
    if args.prompts * args.n % args.micro_batch_size:
        ap.error("--prompts x --n must be a multiple of --micro-batch-size")
    return args


def _configs(args, root: str) -> tuple[dict, dict]:
    """({path name: RunConfig}, the baseline's overrides): the trainer defaults and the baseline."""
    from megagsm.config import load_config, validate
    from bench.gspo_workload import available_knobs, data_overrides, model_overrides, run_overrides

    inputs = {}
    if not (args.data and (args.hf_dir or args.load)):
        from megagsm.demo import DemoSpec, prepare_inputs

        inputs = prepare_inputs(os.path.join(root, "inputs"), DemoSpec(level=2, n_train=256, n_test=8))
    common = [*model_overrides(args, SHAPES[args.shape], inputs.get("base")),
              *data_overrides(args, inputs.get("train")), *run_overrides(args, os.path.join(root, "run"))]
    knobs = available_knobs(load_config(None, common))
    cfgs = {"megagsm": load_config(None, common),
            "baseline": load_config(None, common + [f"{k}={v}" for k, v in knobs.items()])}
    for cfg in cfgs.values():
        validate(cfg, 1)
    return cfgs, knobs


def _trl_spec(args, run, root: str) -> dict:
    """What the TRL worker needs: the HF dir, the prompts megagsm's rounds use, the shapes."""
    import torch

    from megagsm.data.prompts import build_example_prompt

    algorithm, cfg, g = run.algorithm, run.cfg, run.cfg.algorithm.gspo
    indices = [i for step in range(args.steps + 1) for i in algorithm.schedule.step_indices(step)]
    examples = [run.train_examples[i] for i in indices]
    return {"hf_dir": args.hf_dir, "out_dir": os.path.join(root, "trl"), "threads": torch.get_num_threads(),
            "prompts": [build_example_prompt(e, run.tokenizer, cfg.data.prompt_template) for e in examples],
            "prompt_ids": [algorithm.prompt(i) for i in indices], "answers": [e.final_answer for e in examples],
            "prompts_per_step": args.prompts, "n": args.n, "new_tokens": args.new_tokens,
            "micro_batch_size": args.micro_batch_size, "lr": args.lr, "weight_decay": cfg.optim.weight_decay,
            "clip_low": g.clip_ratio_low, "clip_high": g.clip_ratio_high, "steps": args.steps + 1,
            "seed": cfg.train.seed}


def _r(x, digits=3):
    return None if x is None else round(x, digits)


def report(args, run, paths, knobs: dict, trl_rounds: list | None, trl_info: dict | None) -> dict:
    """The JSON line: the trainer defaults' fastest round, the baseline's, TRL's."""
    import torch

    new, base = paths
    best, base_best = new.best(), base.best()
    row = best["row"]
    hidden, layers, heads, kv, ffn, vocab, _ = SHAPES[args.shape]
    model = (f"checkpoint {args.load}" if args.load else f"hf {args.hf_dir}" if args.hf_dir else
             f"qwen2-shaped (h{hidden} L{layers} heads{heads}/kv{kv} ffn{ffn} vocab{vocab})")
    params_m = sum(p.numel() for c in run.chunks for p in c.parameters()) / 1e6
    out = {
        "bench": "gspo_step", "model": f"{model}, {params_m:.2f}M params",
        "dtype": str(run.dtype).replace("torch.", ""),
        "device": "cpu" if run.info.device.type == "cpu" else torch.cuda.get_device_name(),
        "lengths": args.lengths, "two_pass": args.two_pass, "prompts": args.prompts, "n": args.n,
        "rollouts": args.prompts * args.n, "new_tokens": args.new_tokens, "mini_batches": args.mini_batches,
        "micro_batch_size": args.micro_batch_size, "gen_batch": args.gen_batch,
        "step_s": _r(best["step_s"]), "generate_s": _r(best["generate_s"]), "logprob_s": _r(best["logprob_s"]),
        "update_s": _r(best["update_s"]), "padded_token_fraction": _r(best["padded_token_fraction"], 4),
        "share_prompts": new.algorithm.share_prompts,
        "baseline_step_s": _r(base_best["step_s"]), "speedup": _r(base_best["step_s"] / best["step_s"]),
        "baseline_knobs": knobs,
        "baseline": {k: _r(v, 4) if isinstance(v, float) else v for k, v in base_best.items() if k != "row"},
        # CPU seconds (least over rounds): what a step costs on a machine shared with other jobs
        "step_cpu_s": _r(min(r["step_cpu_s"] for r in new.rounds)),
        "baseline_step_cpu_s": _r(min(r["step_cpu_s"] for r in base.rounds)),
        # what the bench printed before it had a baseline (the trainer defaults' fastest round)
        **{k: _r(row[k]) for k in ("time_generate", "time_score", "time_logprob", "time_update")},
        "step_time": _r(best["step_s"]), "generate_share": _r(best["generate_s"] / best["step_s"]),
        "gen_tokens_per_s": _r(best["generated_tokens"] / max(best["generate_s"], 1e-9), 1),
        "tokens_per_s": _r(row["sequence_tokens"] / best["step_s"], 1),
        "response_tokens": int(row["response_tokens"]), "sequence_tokens": int(row["sequence_tokens"]),
        "step_times": [_r(r["step_s"]) for r in new.rounds],
        "baseline_step_times": [_r(r["step_s"]) for r in base.rounds],
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
    }
    if trl_rounds:
        fastest = min(trl_rounds, key=lambda r: r["step_s"])
        trl_cpu = min(r["step_cpu_s"] for r in trl_rounds)
        out.update({
            "trl_step_s": _r(fastest["step_s"]), "trl_generate_s": _r(fastest["generate_s"]),
            "trl_update_s": _r(fastest["update_s"]), "trl_completion_tokens": fastest["completion_tokens"],
            "trl_step_times": [_r(r["step_s"]) for r in trl_rounds],
            # > 1: megagsm's step is that many times faster than TRL's
            "speedup_vs_trl": _r(fastest["step_s"] / best["step_s"]),
            "trl_step_cpu_s": _r(trl_cpu), "speedup_vs_trl_cpu": _r(trl_cpu / out["step_cpu_s"]),
            "trl_prompt_ids_equal": trl_info["prompt_ids_equal"],
            "trl_versions": {k: trl_info[k] for k in ("trl", "transformers", "torch")}})
    return out


def main(argv=None):
    args = parse_args(argv)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megagsm.rl.gspo import GSPO
    from megagsm.runtime import shutdown_runtime
    from megagsm.train import Trainer
    from bench.gspo_paths import build_paths, run_round

    with tempfile.TemporaryDirectory(prefix="megagsm-bench-gspo-") as root:
        cfgs, knobs = _configs(args, root)
        run = Trainer(cfgs["megagsm"], GSPO)
        run.restore()
        paths = build_paths(run, cfgs, args.two_pass)
        trl = None
        if args.vs_trl:
            from bench.gspo_trl import TRLWorker

            trl = TRLWorker(args.trl_python, _trl_spec(args, run, root), os.path.join(root, "trl.json"))
        run_round(paths, run, 0, args.lengths)   # warm-up round, both sides
        if trl is not None:
            trl.step()
        for path in paths:
            path.rounds.clear()
        trl_rounds = []
        for step in range(1, args.steps + 1):
            run_round(paths, run, step, args.lengths)
            if trl is not None:
                trl_rounds.append(trl.step())
        if trl is not None:
            trl.close()
        run.metrics.close()
        shutdown_runtime()
    print(json.dumps(report(args, run, paths, knobs, trl_rounds, trl.info if trl else None)))


if __name__ == "__main__":
    main()

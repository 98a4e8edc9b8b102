"""One GSPO step, timed by phase: generate / score / old log-probs / update, and tokens/s.

    python bench/gspo_step.py                         # ~20M Qwen2-shaped model, CPU, fp32, 1 process
    python bench/gspo_step.py --shape qwen2.5-0.5b    # Qwen2.5-0.5B-shaped (random weights; GPU: bf16)

The step is `megagsm.rl.gspo.GSPO.train_step`, the trainer's own: in-process sampling of
`--prompts` x `--n` rollouts with the trainer's weights, GSM8K scoring, group advantages, the old
log-prob pass and `--mini-batches` optimizer steps through megatron's schedules. Inputs: synthetic
GSM8K-style problems (level 2) and a small BPE tokenizer trained on them (megagsm.demo); the model has
random weights and the given shape, so rollouts run until `--new-tokens` unless the random policy
happens to sample EOS (the JSON reports the tokens actually generated). Group filtering is off, so
every rollout is trained on (random weights score 0: all advantages are 0, the compute is the same). One warm-up step, then
`--steps` timed steps; the fastest is reported (other processes share this machine). Prints one JSON
line.
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
    ap.add_argument("--shape", choices=sorted(SHAPES), default="20m")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mini-batches", type=int, default=1)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--gen-batch", type=int, default=64, help="sequences decoded together")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--two-pass", action="store_true",
                    help="run the old-log-prob pass even when exactly on-policy (mini-batches 1, one epoch): "
                         "the baseline of the on-policy skip")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megagsm.config import load_config
    from megagsm.demo import DemoSpec, prepare_inputs
    from megagsm.rl.gspo import GSPO
    from megagsm.train import Trainer
    from megagsm.runtime import shutdown_runtime

    hidden, layers, heads, kv, ffn, vocab, tied = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="megagsm-bench-gspo-") as root:
        inputs = prepare_inputs(root, DemoSpec(level=2, n_train=256, n_test=8))
        cfg = load_config(None, [
            "algorithm.name=gspo", "model.init=random", f"model.hf_dir={inputs['base']}", f"model.dtype={args.dtype}",
            f"model.hidden_size={hidden}", f"model.num_layers={layers}", f"model.num_attention_heads={heads}",
            f"model.num_query_groups={kv}", f"model.ffn_hidden_size={ffn}", f"model.vocab_size={vocab}",
            f"model.tie_word_embeddings={str(tied).lower()}", "model.max_position_embeddings=4096",
            "data.source=jsonl", f"data.train_path={inputs['train']}", "data.prompt_template=bare",
            "data.max_prompt_len=256", f"data.seq_length={256 + args.new_tokens}",
            "optim.lr=1e-6", "optim.weight_decay=0.1", "optim.clip_grad=1.0",
            f"train.micro_batch_size={args.micro_batch_size}", "train.eval_at_start=false", "train.eval_accuracy=false",
            "train.export_hf=false", f"train.output_dir={os.path.join(root, 'run')}", "train.resume=none",
            f"generation.max_new_tokens={args.new_tokens}", f"generation.max_batch_size={args.gen_batch}",
            "generation.temperature=1.0",
            f"algorithm.gspo.n_rollouts={args.n}", f"algorithm.gspo.prompts_per_step={args.prompts}",
            f"algorithm.gspo.mini_batches={args.mini_batches}", "algorithm.gspo.filter_zero_std_groups=false",
        ])
        run = Trainer(cfg, GSPO)
        if args.two_pass:
            import dataclasses

            run.algorithm.spec = dataclasses.replace(run.algorithm.spec, on_policy=False)
        run.restore()
        params_m = sum(p.numel() for c in run.chunks for p in c.parameters()) / 1e6
        run.algorithm.train_step(0)  # warm-up
        rows = [run.algorithm.train_step(step) for step in range(1, args.steps + 1)]
        run.metrics.close()
        shutdown_runtime()
    best = min(rows, key=lambda r: r["step_time"])
    keys = ("time_generate", "time_score", "time_logprob", "time_update", "step_time")
    print(json.dumps({
        "bench": "gspo_step",
        "model": f"qwen2-shaped {params_m:.1f}M params (h{hidden} L{layers} heads{heads}/kv{kv} ffn{ffn} vocab{vocab})",
        "dtype": str(run.dtype).replace("torch.", ""),
        "device": "cpu" if run.info.device.type == "cpu" else torch.cuda.get_device_name(),
        "two_pass": args.two_pass, "prompts": args.prompts, "n": args.n, "rollouts": args.prompts * args.n, "new_tokens": args.new_tokens,
        "mini_batches": args.mini_batches, "micro_batch_size": args.micro_batch_size,
        **{k: round(best[k], 3) for k in keys},
        "generate_share": round(best["time_generate"] / best["step_time"], 3),
        "gen_tokens_per_s": round(best["gen_tokens_per_s"], 1),
        "tokens_per_s": round(best["tokens_per_s"], 1),
        "response_tokens": int(best["response_tokens"]), "sequence_tokens": int(best["sequence_tokens"]),
        "step_times": [round(r["step_time"], 3) for r in rows],
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()

"""Generation throughput: megagsm's engine against transformers `generate`, same weights, one run.

    python bench/generate.py                      # batch 8 and 32, 64-token prompts, 128 new tokens
    python bench/generate.py --dtype bf16 --threads 2

A ~20M-parameter Qwen2-shaped model (hidden 512, 4 layers, 8 heads / 2 KV groups, FFN 1536, vocab
8192) with random weights is built in transformers, converted to megatron, and both decode greedily
from the same prompts for exactly `--new-tokens` tokens (no EOS). transformers runs with SDPA
attention and, per batch size, the faster of its dynamic and static caches. Runs are interleaved
(`--repeats` rounds) and the best round of each side is kept, which filters out other processes on a
shared machine. tokens/s counts new tokens over the whole call (prefill included). Prints one JSON
line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-caches", nargs="+", default=["dynamic", "static"])
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


@contextlib.contextmanager
def without_cpu_compat():
    """transformers does not need megagsm's CPU layer for megatron: time it without that overhead."""
    from megagsm.runtime import cpu_compat

    if not cpu_compat.is_installed():
        yield
        return
    from torch.overrides import _pop_mode_temporarily

    with _pop_mode_temporarily():
        yield


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megagsm.config.parallel import ParallelConfig
    from megagsm.generation import SamplingParams, generate
    from megagsm.runtime import init_runtime, shutdown_runtime
    from megagsm.testing.tiny_qwen2 import build_megatron_from_hf, make_hf_model, tiny_qwen2_config

    init_runtime(ParallelConfig(), seed=args.seed)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    hf_config = tiny_qwen2_config(vocab_size=8192, hidden_size=512, layers=4, heads=8, kv_heads=2,
                                  ffn=1536, max_positions=4096)
    hf = make_hf_model(hf_config, seed=args.seed)
    megatron = build_megatron_from_hf(hf, params_dtype=dtype)
    hf = hf.to(dtype)
    params_m = sum(p.numel() for p in hf.parameters()) / 1e6

    results = []
    for batch in args.batch:
        gen = torch.Generator().manual_seed(args.seed + batch)
        prompts = torch.randint(1, hf_config.vocab_size, (batch, args.prompt_len), generator=gen)
        sampling = SamplingParams(max_new_tokens=args.new_tokens, greedy=True, logprobs="raw")

        def run_megagsm():
            out = generate(megatron, prompts.tolist(), sampling)
            return out.tokens

        def run_hf(cache):
            kwargs = {"cache_implementation": "static"} if cache == "static" else {}
            with without_cpu_compat(), torch.no_grad():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  pad_token_id=0, **kwargs)
            return out[:, args.prompt_len:]

        best, best_cpu, outputs = {}, {}, {}
        runs = [("megagsm", run_megagsm)] + [(f"hf_{c}", lambda c=c: run_hf(c)) for c in args.hf_caches]
        for name, fn in runs:  # warm-up (first-call allocations, static-cache setup)
            outputs[name] = fn()
        tokens = batch * args.new_tokens
        for _ in range(args.repeats):
            for name, fn in runs:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                best[name] = max(best.get(name, 0.0), tokens / dt)
                best_cpu[name] = max(best_cpu.get(name, 0.0), tokens / dc)
        hf_name = max((n for n in best if n.startswith("hf_")), key=best.get)
        hf_cpu_name = max((n for n in best_cpu if n.startswith("hf_")), key=best_cpu.get)
        same = (outputs["megagsm"] == outputs[hf_name]).float().mean().item()
        results.append({
            "batch": batch,
            "megagsm_tok_s": round(best["megagsm"], 1),
            "transformers_tok_s": round(best[hf_name], 1),
            "transformers_cache": hf_name[3:],
            "ratio": round(best["megagsm"] / best[hf_name], 3),
            "all_transformers_tok_s": {n[3:]: round(v, 1) for n, v in best.items() if n != "megagsm"},
            # tokens per second of this process's CPU time: steadier than wall time on a shared
            # machine (other processes' load does not count), same ranking when it is idle
            "megagsm_tok_per_cpu_s": round(best_cpu["megagsm"], 1),
            "transformers_tok_per_cpu_s": round(best_cpu[hf_cpu_name], 1),
            "cpu_time_ratio": round(best_cpu["megagsm"] / best_cpu[hf_cpu_name], 3),
            "greedy_tokens_equal": round(same, 4),
        })
    shutdown_runtime()
    print(json.dumps({
        "bench": "generate",
        "model": f"qwen2-shaped {params_m:.1f}M params (h512 L4 heads8/kv2 ffn1536 vocab8192)",
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "results": results,
    }))


if __name__ == "__main__":
    main()

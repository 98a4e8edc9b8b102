"""Refilled (continuous-batching) against static generation on long-tailed response lengths.

    OMP_NUM_THREADS=1 python bench/refill.py                 # 64 prompts x 8, 128 new tokens, batch 64

A small Qwen2-shaped model with random weights (megagsm's converter, as bench/generate.py) samples
`--prompts` x `--n` sequences twice per round: `generate_batched` (generation.continuous_batching=false:
generate() per group of `--batch` sequences, each group decoding until its longest row ends) and
`generate_refilled` (one call; freed rows take waiting prompts). Random weights rarely sample EOS, so
each sequence's length is forced (`response_lengths`): drawn log-normal with median `--new-tokens`/4
and 5% at the cap (sigma = ln 4 / 1.645), the same lengths for both paths. Prompt lengths are
uniform in [`--prompt-len`/2, `--prompt-len`]. Rounds are interleaved; the fastest of each is kept,
in wall seconds and in this process's CPU seconds (less sensitive to other processes on a shared
machine). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="max_batch_size (sequences decoded together)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="0: greedy (no torch.multinomial, whose CPU cost per row rivals the forward's)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def skewed_lengths(count: int, cap: int, seed: int) -> list[int]:
    """Log-normal lengths, median cap/4, P(length >= cap) = 5%, clamped to [1, cap]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sigma = math.log(4) / 1.645
    draws = torch.exp(math.log(cap / 4) + sigma * torch.randn(count, generator=g))
    return draws.round().clamp(1, cap).long().tolist()


def main(argv=None):
    args = parse_args(argv)
    import torch

    from megagsm.config.parallel import ParallelConfig
    from megagsm.generation import SamplingParams, generate_batched, generate_refilled
    from megagsm.runtime import init_runtime, shutdown_runtime
    from megagsm.testing.tiny_qwen2 import convert, load_converted, make_hf_model, tiny_qwen2_config

    init_runtime(ParallelConfig(), seed=args.seed)
    hf_config = tiny_qwen2_config(vocab_size=8192, hidden_size=args.hidden, layers=args.layers, heads=8,
                                  kv_heads=2, ffn=3 * args.hidden, max_positions=4096)
    with tempfile.TemporaryDirectory(prefix="bench-refill-") as work:
        model, vocab = load_converted(convert(make_hf_model(hf_config, seed=args.seed), None, work),
                                      ParallelConfig(), torch.float32)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(args.prompt_len // 2, args.prompt_len + 1, (1,),
                                                             generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    lengths = skewed_lengths(args.prompts * args.n, args.new_tokens, args.seed)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, n=args.n, seed=args.seed,
                            stop_token_ids=[2])
    paths = {"static": generate_batched, "refilled": generate_refilled}
    best = {name: float("inf") for name in paths}
    best_cpu = dict(best)
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t, c = time.perf_counter(), time.process_time()
            out = fn(model, prompts, params, max_batch_size=args.batch, vocab_limit=vocab, response_lengths=lengths)
            best[name] = min(best[name], time.perf_counter() - t)
            best_cpu[name] = min(best_cpu[name], time.process_time() - c)
            tokens[name] = int(out.lengths.sum())
    shutdown_runtime()
    sorted_lengths = sorted(lengths)
    print(json.dumps({
        "bench": "refill", "prompts": args.prompts, "n": args.n, "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "batch": args.batch, "model": f"qwen2-shaped h{args.hidden} L{args.layers} vocab8192 fp32",
        "median_length": sorted_lengths[len(lengths) // 2],
        "at_cap_fraction": round(sum(n == args.new_tokens for n in lengths) / len(lengths), 3),
        # a sampled EOS (id 2) can end a sequence before its forced length, differently per path
        "static_tokens": tokens["static"], "refilled_tokens": tokens["refilled"],
        "static_s": round(best["static"], 3), "refilled_s": round(best["refilled"], 3),
        "speedup": round(best["static"] / best["refilled"], 3),
        "static_cpu_s": round(best_cpu["static"], 3), "refilled_cpu_s": round(best_cpu["refilled"], 3),
        "cpu_speedup": round(best_cpu["static"] / best_cpu["refilled"], 3), "threads": torch.get_num_threads(),
        "cpu": platform.machine(),
    }))


if __name__ == "__main__":
    main()

"""Generation throughput: megagsm's engine against transformers `generate`, same weights, one run.

    python bench/generate.py                      # batch 8 and 32, 64-token prompts, 128 new tokens
    python bench/generate.py --dtype bf16 --threads 2

A ~20M-parameter Qwen2-shaped model (hidden 512, 4 layers, 8 heads / 2 KV groups, FFN 1536, vocab
8192) with random weights is built in transformers, converted to megatron with megagsm's converter
(hf-to-mcore, then the provider's build + load), and both decode greedily
from the same prompts for exactly `--new-tokens` tokens (no EOS). transformers runs with SDPA
attention and, per batch size, the faster of its dynamic and static caches. Runs are interleaved
(`--repeats` rounds) and the best round of each side is kept, which filters out other processes on a
shared machine. tokens/s counts new tokens over the whole call (prefill included). Prints one JSON
line.

Decode alone and its roofline: each side also runs the same prompts for one new token (the prefill
and a first sample); decode seconds per step = (full call - that call) / (new_tokens - 1), so decode
tokens/s = batch / that. The roofline is what memory bandwidth allows a decoding step:
    batch / ((weight bytes + KV-cache bytes read per step) / bandwidth)
weight bytes: every parameter a step reads (all but the input embedding table, of which a step reads
`batch` rows); KV bytes: 2 (K and V) x layers x batch x mean context (prompt + new_tokens / 2) x KV heads
x head dim x element size. Bandwidth is measured in the same run: the best of several copies of a
large tensor on the device (bytes read + written / time). On CUDA both models run on the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from functools import partial
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


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_bandwidth(device, mib: int) -> float:
    """Bytes per second of a device-to-device copy (read + write), best of 5."""
    import torch

    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def decode_bytes_per_step(hf_config, params_read: int, elem: int, batch: int, context: float) -> float:
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    kv = 2 * hf_config.num_hidden_layers * batch * context * hf_config.num_key_value_heads * head_dim * elem
    return params_read * elem + kv


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
    import tempfile

    from megagsm.config.parallel import ParallelConfig
    from megagsm.generation import SamplingParams, generate
    from megagsm.runtime import init_runtime, shutdown_runtime
    from megagsm.testing.tiny_qwen2 import convert, load_converted, make_hf_model, tiny_qwen2_config

    info = init_runtime(ParallelConfig(), seed=args.seed)
    device = info.device
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    hf_config = tiny_qwen2_config(vocab_size=8192, hidden_size=512, layers=4, heads=8, kv_heads=2,
                                  ffn=1536, max_positions=4096)
    hf = make_hf_model(hf_config, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as work:
        # the same weights on both sides: megagsm's converter (hf-to-mcore) and provider load
        megatron, vocab = load_converted(convert(hf, None, work), ParallelConfig(), dtype)
    hf = hf.to(device=device, dtype=dtype)
    params_m = sum(p.numel() for p in hf.parameters()) / 1e6
    elem = torch.finfo(dtype).bits // 8
    embedding = hf_config.vocab_size * hf_config.hidden_size
    params_read = sum(p.numel() for p in hf.parameters()) - embedding  # untied: the output layer counts
    bandwidth = memory_bandwidth(device, 1024 if device.type == "cuda" else 256)

    results = []
    for batch in args.batch:
        gen = torch.Generator().manual_seed(args.seed + batch)
        prompts = torch.randint(1, hf_config.vocab_size, (batch, args.prompt_len), generator=gen)
        hf_prompts = prompts.to(device)

        def run_megagsm(new_tokens):
            sampling = SamplingParams(max_new_tokens=new_tokens, greedy=True, logprobs="raw")
            out = generate(megatron, prompts.tolist(), sampling, vocab_limit=vocab)
            return out.tokens

        def run_hf(cache, new_tokens):
            kwargs = {"cache_implementation": "static"} if cache == "static" else {}
            with without_cpu_compat(), torch.no_grad():
                out = hf.generate(hf_prompts, attention_mask=torch.ones_like(hf_prompts), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=0, **kwargs)
            return out[:, args.prompt_len:].cpu()

        call_s, cpu_s, first_token_s, outputs = {}, {}, {}, {}  # best (lowest) of the rounds
        runs = [("megagsm", run_megagsm)] + [(f"hf_{c}", partial(run_hf, c)) for c in args.hf_caches]
        for name, fn in runs:  # warm-up (first-call allocations, static-cache setup)
            outputs[name] = torch.as_tensor(fn(args.new_tokens))
            fn(1)

        def timed(fn, new_tokens):
            synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(new_tokens)
            synchronize()
            return time.perf_counter() - t0, time.process_time() - c0

        for _ in range(args.repeats):
            for name, fn in runs:
                wall, cpu = timed(fn, args.new_tokens)
                call_s[name] = min(call_s.get(name, float("inf")), wall)
                cpu_s[name] = min(cpu_s.get(name, float("inf")), cpu)
                first_token_s[name] = min(first_token_s.get(name, float("inf")), timed(fn, 1)[0])
        tokens = batch * args.new_tokens
        best = {n: tokens / t for n, t in call_s.items()}
        best_cpu = {n: tokens / t for n, t in cpu_s.items()}
        decode_tok_s = {n: batch * (args.new_tokens - 1) / max(call_s[n] - first_token_s[n], 1e-9)
                        for n in call_s}
        hf_name = max((n for n in best if n.startswith("hf_")), key=best.get)
        hf_cpu_name = max((n for n in best_cpu if n.startswith("hf_")), key=best_cpu.get)
        same = (outputs["megagsm"] == outputs[hf_name]).float().mean().item()
        step_bytes = decode_bytes_per_step(hf_config, params_read, elem, batch,
                                           args.prompt_len + args.new_tokens / 2)
        roofline = batch * bandwidth / step_bytes
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
            "megagsm_decode_tok_s": round(decode_tok_s["megagsm"], 1),
            "transformers_decode_tok_s": round(decode_tok_s[hf_name], 1),
            "decode_bytes_per_step": round(step_bytes),
            "decode_roofline_tok_s": round(roofline, 1),
            "megagsm_decode_frac_of_roofline": round(decode_tok_s["megagsm"] / roofline, 3),
            "transformers_decode_frac_of_roofline": round(decode_tok_s[hf_name] / roofline, 3),
        })
    shutdown_runtime()
    print(json.dumps({
        "bench": "generate",
        "model": f"qwen2-shaped {params_m:.1f}M params (h512 L4 heads8/kv2 ffn1536 vocab8192)",
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "device": "cpu" if device.type != "cuda" else torch.cuda.get_device_name(),
        "memory_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "results": results,
    }))


if __name__ == "__main__":
    main()

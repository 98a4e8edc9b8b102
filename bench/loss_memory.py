"""Peak memory of the SFT loss kernel: output projection + cross-entropy, forward + backward, 8192 tokens
x 32768 vocab, hidden 512, fp32, for the plain path (matmul + megatron's `vocab_parallel_cross_entropy`)
and `megagsm.sft.fused_ce` (chunks of 1024 tokens; gradients formed in the forward pass given the loss
mask, and the recompute variant without it), each in a fresh process, as the growth of the process's
peak RSS (VmHWM, reset just before) over its RSS before the step. Linux only (/proc).

    python bench/loss_memory.py          # one JSON line; bench/sft.py includes it as `loss_memory`
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

MEM_SHAPE = dict(tokens=8192, hidden=512, vocab=32768, chunk=1024)


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM (peak RSS) of this process from /proc (Linux). Unlike getrusage's ru_maxrss,
    VmHWM is not inherited from the parent process, and writing 5 to clear_refs resets it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str) -> dict:
    from megatron.core import tensor_parallel

    from megagsm.config.parallel import ParallelConfig
    from megagsm.runtime import init_runtime
    from megagsm.sft.fused_ce import chunked_vocab_parallel_cross_entropy

    init_runtime(ParallelConfig(), seed=0)
    n, h, v = MEM_SHAPE["tokens"], MEM_SHAPE["hidden"], MEM_SHAPE["vocab"]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 1, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (1, n), generator=gen)
    mask = torch.ones(1, n)

    def step():
        if variant == "plain":
            logits = torch.matmul(hidden, weight.t())  # megatron's output layer at TP=1
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()
        elif variant == "chunked":  # gradients formed in the forward pass (loss mask given)
            loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, MEM_SHAPE["chunk"],
                                                        loss_mask=mask)
        else:  # chunked, logits recomputed in the backward pass
            loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, MEM_SHAPE["chunk"])
        (loss * mask).sum().backward()
        value = loss.detach().sum().item()
        hidden.grad = weight.grad = None
        return value

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = max(_status_bytes("VmRSS"), _status_bytes("VmHWM"))
    t = time.perf_counter()
    value = step()
    seconds = time.perf_counter() - t
    peak = _status_bytes("VmHWM")
    return {"peak_extra_mib": round((peak - before) / 2**20, 1), "seconds": round(seconds, 3), "loss_sum": value}


def memory() -> dict:
    out = {"shape": dict(MEM_SHAPE), "full_logits_fp32_mib": MEM_SHAPE["tokens"] * MEM_SHAPE["vocab"] * 4 / 2**20}
    # a fresh rendezvous per child: this process's torch.distributed port is still bound
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    for variant in ("plain", "chunked", "chunked_recompute"):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", variant], capture_output=True, text=True,
            env=dict(env, PYTHONWARNINGS="ignore"), check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=["plain", "chunked", "chunked_recompute"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    print(json.dumps(memory_child(args.child) if args.child else memory()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import warnings

    warnings.filterwarnings("ignore")
    main()

"""python -m megagsm.plan --config RECIPE [section.field=value ...] [--world-size N] [--gpu-memory-gib 80]

Prints a per-rank table (the worst pipeline stage) and, last, one JSON line with static_gib,
train_peak_gib, generate_peak_gib and fits. Exit status 2 on a config error."""
from __future__ import annotations

import argparse
import json
import sys

from megagsm.errors import exit_on_user_error

GIB = 1024**3


def table(plan) -> str:
    w = plan.worst
    rows = [
        ("params", w.params, f"{w.counts['total']:,} elements on this rank, {w.counts['trainable']:,} trainable"),
        ("grads", w.grads, "DDP grad buffer (padded as megatron pads it)"),
        ("optimizer", w.optimizer, f"fp32 main + Adam m, v; DP {plan.dp}, expert DP {plan.expert_dp}"),
        ("= static", w.static, "exact"),
        ("activations", w.activations, "Korthikanti et al. 2022 Table 2, per micro-batch in flight"),
        ("logits", w.logits, "last stage; chunked CE or plain"),
        ("= train peak", w.train_peak, "estimate"),
        ("kv cache", w.kv_cache, "generation batch, prompt + response positions"),
        ("gen working set", w.generation_work, "prefill of one layer + last-position logits"),
        ("= generate peak, resident", w.generate_peak(False), "grads + optimizer kept during rollouts"),
        ("= generate peak, released", w.generate_peak(True), "grads freed, optimizer offloaded"),
    ]
    lines = [f"# per-rank memory, pipeline stage {w.stage} of {len(plan.stages)}, world size {plan.world_size}"]
    lines += [f"# {n}" for n in plan.notes]
    lines += [f"{name:<28}{size / GIB:>10.2f} GiB   {why}" for name, size, why in rows]
    return "\n".join(lines)


def header_line(s: dict) -> str:
    """The comment line each shipped recipe carries (tests/test_plan.py checks it is current)."""
    return (f"# planner (python -m megagsm.plan), GiB per GPU of {s['gpu_memory_gib']:g}: static {s['static_gib']:.1f}, "
            f"train peak {s['train_peak_gib']:.1f}, generate peak {s['generate_peak_resident_gib']:.1f} "
            f"({s['generate_peak_released_gib']:.1f} with grads/optimizer released)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megagsm.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks (default: parallel.world_size, else the recipe's '# world_size:' comment)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--no-grad-reduce-in-fp32", action="store_true",
                        help="grads in the param dtype (megagsm's wrap_ddp reduces in fp32 by default)")
    parser.add_argument("--header", action="store_true",
                        help="print only the recipe header line stating the planner's figures")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    from megagsm.config.loader import load_config
    from megagsm.plan.core import plan_memory, resolve_world_size

    cfg = load_config(args.config, args.overrides)
    world = resolve_world_size(cfg, args.config, args.world_size)
    plan = plan_memory(cfg, world, args.gpu_memory_gib, grad_reduce_in_fp32=not args.no_grad_reduce_in_fp32)
    summary = plan.summary()
    if args.header:
        print(header_line(summary))
        return 0
    print(table(plan))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))

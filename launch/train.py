"""megagsm training entry point.

    torchrun --nproc-per-node N launch/train.py --config launch/recipes/<name>.yaml [section.field=value ...]

The config is loaded (recipe YAML, then overrides left to right) and validated against the world size
before any process group starts, so a bad value exits with status 2 and a one-line message naming the
field. `algorithm.name` picks the trainer: sft (megagsm.sft) or gspo (megagsm.rl).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

EXAMPLES = """\
examples:
  torchrun --nproc-per-node 8 launch/train.py --config launch/recipes/sft_qwen2.5_0.5b.yaml train.train_steps=500
  torchrun --nproc-per-node 2 launch/train.py --config launch/recipes/sft_demo_cpu.yaml train.resume=none
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    from megagsm.config.describe import describe_fields

    epilog = ("config fields (override as section.field=value; lists as [a,b]; null for None):\n"
              + "\n".join(describe_fields()) + "\n\n" + EXAMPLES)
    parser = argparse.ArgumentParser(
        prog="launch/train.py", description="megagsm: SFT / GSPO training with megatron-core.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="recipe YAML (launch/recipes/*.yaml); omitted: defaults only")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (no training)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, applied after the recipe")
    return parser.parse_args(argv)


def dispatch(cfg) -> None:
    """algorithm.name -> the algorithm the shared trainer runs (megagsm.train.Trainer)."""
    from megagsm.train import Trainer

    if cfg.algorithm.name == "sft":
        from megagsm.sft.step import SFT as algorithm
    else:
        from megagsm.rl.gspo import GSPO as algorithm
    Trainer(cfg, algorithm).fit()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from megagsm.config import ConfigError, load_config, to_yaml, validate
    from megagsm.runtime import launch_env

    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, launch_env()[1])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from megagsm.runtime import shutdown_runtime

    from megagsm.errors import exit_on_user_error

    def run() -> int:
        dispatch(cfg)  # user errors found once the model or data are read (e.g. sizes in hf_dir)
        return 0

    status = exit_on_user_error(run)
    if status:
        return status
    shutdown_runtime()  # not on failure: the barrier inside would wait for ranks that are gone
    return 0


if __name__ == "__main__":
    sys.exit(main())

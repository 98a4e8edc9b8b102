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
    if cfg.algorithm.name == "sft":
        from megagsm.sft.trainer import run_sft

        run_sft(cfg)
        return
    try:
        from megagsm.rl import run_gspo
    except ImportError:
        raise SystemExit(f"algorithm.name={cfg.algorithm.name!r}: the GSPO trainer (megagsm.rl.run_gspo) "
                         "is not in this checkout yet; available: sft") from None
    run_gspo(cfg)


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

    try:
        dispatch(cfg)
    except ConfigError as e:  # found once the model or data are read (e.g. sizes in hf_dir)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    shutdown_runtime()  # not on failure: the barrier inside would wait for ranks that are gone
    return 0


if __name__ == "__main__":
    sys.exit(main())

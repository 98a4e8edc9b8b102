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


def _launched() -> bool:
    """Started by torchrun or Slurm (the world size is the launch's), not by plain python."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or "SLURM_NTASKS" in os.environ


def checked_config(args):
    """The loaded config, validated before any process group starts: against parallel.world_size
    when set (and a launch must then give exactly that), else against the launch's world size;
    --print-config under plain python with neither skips the world-size checks with a note."""
    from megagsm.config import load_config, validate
    from megagsm.config.validate import check_paths
    from megagsm.runtime import launch_env

    cfg = load_config(args.config, args.overrides)
    world = launch_env()[1] if _launched() or not args.print_config else None
    if world is None and not cfg.parallel.world_size:
        print("note: layout not checked against a world size (set parallel.world_size=N, or launch "
              "with torchrun)", file=sys.stderr)
    validate(cfg, world, launched=_launched() or not args.print_config)
    if not args.print_config:
        check_paths(cfg)  # local inputs exist (a recipe's cluster paths need not exist for --print-config)
    return cfg


def _prefix(error) -> str:
    from megagsm.config import ConfigError

    return "config error" if isinstance(error, ConfigError) else "error"


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 with one line on stderr (once per launch) for a config or other user error."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from megagsm.errors import UserError, exit_on_user_error, report_user_error

    try:
        cfg = checked_config(args)
    except UserError as e:  # before any process group: every rank returns, one of them prints
        return report_user_error(e, _prefix(e))
    if args.print_config:
        from megagsm.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    from megagsm.runtime import shutdown_runtime

    def train() -> None:
        dispatch(cfg)  # a user error found later (data, model files, checkpoints) ends the launch
        shutdown_runtime()  # not on failure: the barrier inside would wait for ranks that are gone

    return exit_on_user_error(train, _prefix)


if __name__ == "__main__":
    sys.exit(main())

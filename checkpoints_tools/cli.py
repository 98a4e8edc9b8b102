"""`python -m checkpoints_tools {hf-to-mcore, mcore-to-hf, verify}`.

Multi-rank layouts run under torchrun, e.g.
    torchrun --nproc-per-node 2 -m checkpoints_tools hf-to-mcore --hf-dir D --out M --tp 2
Exit status: 0 done, 1 verify above tolerance (or an unexpected failure, with a traceback),
2 bad input (one line on stderr naming the file, field or tensor; nothing written at the output).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys



def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MB, 1048576)")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).upper()]
    if m.group(3) and m.group(3).lower() == "ib":
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m checkpoints_tools",
        description="Convert Hugging Face checkpoints to megatron-core torch_dist checkpoints and back, "
                    "and check logit parity. Multi-rank layouts: torchrun --nproc-per-node N -m "
                    "checkpoints_tools ... Exit status 2 = bad input (nothing written).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def layout(p, what: str):
        p.add_argument("--tp", type=_positive, default=1,
                       help=f"tensor-parallel size {what} (default 1)")
        p.add_argument("--pp", type=_positive, default=1,
                       help=f"pipeline-parallel size {what} (default 1)")
        p.add_argument("--ep", type=_positive, default=1,
                       help=f"expert-parallel size {what}; 1 for dense models (default 1)")

    def common(p):
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing output directory (only once the new one is complete)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="convert weights holding NaN/Inf (default: an error naming the tensor)")

    p = sub.add_parser("hf-to-mcore", help="HF safetensors dir -> megatron torch_dist checkpoint",
                       description="Write a megatron dist_checkpointing (torch_dist) checkpoint that loads at any "
                                   "TP/PP/EP layout, plus the HF config and tokenizer files (in OUT/hf/). Each rank "
                                   "reads only the tensor slices it owns. Run N = tp*pp processes (torchrun) for "
                                   "tp*pp > 1; the layout only decides how the work is split.")
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    layout(p, "used to split the conversion over ranks")
    common(p)

    p = sub.add_parser("mcore-to-hf", help="megatron torch_dist checkpoint -> HF safetensors dir",
                       description="Export a torch_dist model checkpoint (written at any layout) to an HF model "
                                   "directory loadable with transformers: safetensors (sharded with an index "
                                   "when bigger than --max-shard-size), config.json and tokenizer files. "
                                   "Runs in one process.")
    p.add_argument("--mcore-dir", required=True, help="megatron checkpoint directory")
    p.add_argument("--out", required=True, help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--hf-config-dir", default=None,
                   help="where config.json and tokenizer files are, when MCORE_DIR has no hf/ subdirectory "
                        "(e.g. a checkpoint saved by plain megatron)")
    p.add_argument("--max-shard-size", type=_size, default=_size("5GB"),
                   help="largest safetensors file before sharding (default 5GB; accepts 500MB, 2GiB, bytes)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast weights to this dtype (default: keep the checkpoint's dtypes)")
    common(p)

    p = sub.add_parser("verify", help="compare transformers and megatron logits on one token batch",
                       description="Run transformers on HF_DIR and megatron on MCORE_DIR (at the given layout) on "
                                   "the same random token batch; print one JSON line with max_abs_logit_diff, "
                                   "mean_abs_logit_diff, argmax_match (fraction of positions with the same top "
                                   "token) and ok; exit 1 when max_abs_logit_diff > tolerance.")
    p.add_argument("--hf-dir", required=True, help="HF model directory (the reference)")
    p.add_argument("--mcore-dir", required=True, help="megatron checkpoint directory")
    layout(p, "to run megatron at")
    p.add_argument("--batch-size", type=_positive, default=2, help="sequences in the batch (default 2)")
    p.add_argument("--seq-len", type=_positive, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token batch (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="compute dtype of both models (default float32)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted max |logit diff| (default 1e-3 float32, 0.5 bfloat16, 0.25 float16)")
    return parser


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _precheck(args) -> None:
    """Cheap input checks before torch/megatron are imported."""
    from megagsm.models.errors import ModelInputError
    from megagsm.models.hf_config import load_hf_config
    from megagsm.models.registry import check_model_type

    for attr in ("hf_dir", "mcore_dir", "hf_config_dir"):
        path = getattr(args, attr, None)
        if path is not None and not os.path.isdir(path):
            raise ModelInputError(f"--{attr.replace('_', '-')} {path}: no such directory")
    source = getattr(args, "hf_config_dir", None) or getattr(args, "hf_dir", None) or args.mcore_dir
    if args.command == "mcore-to-hf" and not args.hf_config_dir:  # its HF config lives in hf/
        from megagsm.models.hf_config import HF_SUBDIR

        if not any(os.path.isfile(os.path.join(source, *p, "config.json")) for p in ((HF_SUBDIR,), ())):
            raise ModelInputError(f"--mcore-dir {source}: no {HF_SUBDIR}/config.json (the HF config and "
                                  "tokenizer a megagsm checkpoint carries); pass --hf-config-dir DIR with "
                                  "the model's config.json and tokenizer")
    check_model_type(load_hf_config(source).get("model_type"))
    if getattr(args, "out", None) and os.path.exists(args.out) and not args.overwrite:
        raise ModelInputError(f"--out {args.out}: already exists (pass --overwrite to replace it)")


def _check_layout(args, config_dir) -> None:
    """The model must split at the layout (named config field), then the processes must match it."""
    from megagsm.models.errors import ModelInputError
    from megagsm.models.provider import load_hf_config, provider_for

    provider_for(load_hf_config(config_dir)).check_layout(_layout_only(args))
    _, world = _world()
    if world % (args.tp * args.pp):
        raise ModelInputError(
            f"layout: --tp {args.tp} --pp {args.pp} needs a multiple of {args.tp * args.pp} processes, "
            f"got {world}; launch with: torchrun --nproc-per-node {args.tp * args.pp} -m checkpoints_tools "
            f"{args.command} ..."
        )


def _init(args):
    from megagsm.config.parallel import ParallelConfig
    from megagsm.runtime import init_runtime

    # conversion moves CPU tensors: gloo even on GPU machines; verify runs the model where it lives
    backend = "gloo" if args.command == "hf-to-mcore" else "auto"
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, backend=backend)
    init_runtime(parallel)
    return parallel


def run(args) -> int:
    rank, _ = _world()
    _precheck(args)
    if args.command == "hf-to-mcore":
        from megagsm.checkpoint.hf_to_mcore import convert_hf_to_mcore

        _check_layout(args, args.hf_dir)  # before any process group exists
        parallel = _init(args)
        summary = convert_hf_to_mcore(args.hf_dir, args.out, parallel, overwrite=args.overwrite,
                                      progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite)
        if rank == 0:
            print(json.dumps({"command": "hf-to-mcore", "out": args.out, **summary}))
        return 0
    if args.command == "mcore-to-hf":
        if rank != 0:
            return 0  # one process does it; extra torchrun ranks have nothing to do
        from megagsm.checkpoint.mcore_to_hf import convert_mcore_to_hf

        summary = convert_mcore_to_hf(args.mcore_dir, args.out, hf_config_dir=args.hf_config_dir,
                                      max_shard_bytes=args.max_shard_size, dtype=args.dtype,
                                      overwrite=args.overwrite, progress=not args.no_progress,
                                      allow_nonfinite=args.allow_nonfinite)
        print(json.dumps({"command": "mcore-to-hf", "out": args.out, **summary}))
        return 0
    from megagsm.checkpoint.verify import verify_logits

    _check_layout(args, args.mcore_dir)
    parallel = _init(args)
    report = verify_logits(args.hf_dir, args.mcore_dir, parallel, batch=args.batch_size, seq=args.seq_len,
                           seed=args.seed, dtype=args.dtype, tolerance=args.tolerance)
    if rank == 0:
        print(json.dumps(report))
    return 0 if report["ok"] else 1


def _layout_only(args):
    from megagsm.config.parallel import ParallelConfig

    return ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep)


def run_command(argv=None, keep_process_group: bool = False) -> int:
    """Parses argv and runs one command; returns the exit status (0, or 1 for verify above
    tolerance). Bad input raises megagsm.errors.UserError. The process group is shut down after a
    success (after a failure the other ranks may be gone: the launcher ends them)."""
    from megagsm.utils.logging import filter_cli_warnings

    args = build_parser().parse_args(argv)
    filter_cli_warnings()
    import megagsm.checkpoint  # noqa: F401  (guards every checkpoint read: megagsm.checkpoint.safe_pickle)

    code = run(args)
    if not keep_process_group:
        _shutdown()
    return code


def main(argv=None, keep_process_group: bool = False) -> int:
    """Runs one command in this process; returns the exit status. A UserError is printed by rank 0
    as one line and gives status 2. keep_process_group: leave torch.distributed up afterwards (for
    callers that run several commands in one process, e.g. tests)."""
    from megagsm.errors import EXIT_USER_ERROR, UserError

    try:
        return run_command(argv, keep_process_group)
    except UserError as e:
        if _world()[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        if not keep_process_group and _world()[1] == 1:
            _shutdown()
        return EXIT_USER_ERROR


def _shutdown() -> None:
    if "megagsm.runtime" in sys.modules:
        from megagsm.runtime import shutdown_runtime

        shutdown_runtime()

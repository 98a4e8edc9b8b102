"""`python -m megagsm.eval`: score a checkpoint (or an HF model dir) on a data file.

    python -m megagsm.eval --load CKPT_OR_HF_DIR --data test.parquet [--n 4 --temperature 0.7 --top-p 0.95]
    torchrun --nproc-per-node 2 -m megagsm.eval --load CKPT --data aime.parquet --tp 2 --output results.jsonl

Each sample is scored with the reward of its example's data_source (verl's mapping: openai/gsm8k ->
gsm8k, MATH sets -> math, math_dapo / aime* -> math_dapo), or with --reward. `--output` gets one JSON
line per sample (index, sample, prompt, response, reward, correct, data_source) and a last line with
the summary, which is also printed: accuracy (mean over samples), pass_at_k, maj_at_k, n, per_source.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megagsm.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True,
                   help="a megatron checkpoint (trainer or converter output, or a save dir: its newest) or an HF "
                        "model dir (converted on the fly)")
    p.add_argument("--data", required=True, nargs="+", help="jsonl/parquet file(s), datasets dir or name "
                   "(openai/gsm8k or verl's layout)")
    p.add_argument("--split", default="test", help="split of a datasets source (default: test)")
    p.add_argument("--prompt-key", default="question", help="column or dotted path of the prompt (default: question)")
    p.add_argument("--answer-key", default="answer", help="column or dotted path of the answer (default: answer)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt: k of pass@k / maj@k (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response limit in tokens (default 256)")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="prompts are cut to this many tokens (default 1024)")
    p.add_argument("--truncation", choices=["left", "right", "error"], default="left",
                   help="which end of a longer prompt is cut, or refuse it (default: left)")
    p.add_argument("--template", default="default", help="prompt template for text prompts (default: "
                   "gsm8k_step_by_step); chat-message prompts are used as they are")
    p.add_argument("--reward", default="auto", help="reward for every sample: auto (by data_source, default), "
                   "gsm8k, gsm8k_flexible, math, math_dapo")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples (0: all)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (default 1)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--output", help="per-sample JSONL, then the summary line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from megagsm.errors import exit_on_user_error

    return exit_on_user_error(lambda: run(args))


def run(args) -> int:
    import torch

    from megagsm.checkpoint.hf_to_mcore import convert_hf_to_mcore
    from megagsm.checkpoint.manager import resolve_checkpoint
    from megagsm.checkpoint.model_weights import load_mcore_checkpoint
    from megagsm.config.parallel import ParallelConfig
    from megagsm.data import load_gsm8k_files
    from megagsm.errors import UserError
    from megagsm.eval.core import EvalSampling, evaluate_model
    from megagsm.models import provider
    from megagsm.rewards import scorer_for
    from megagsm.runtime import init_runtime, shutdown_runtime
    from megagsm.runtime.collectives import broadcast_object
    from megagsm.utils.rank import is_rank0

    for name in ("n", "max_new_tokens", "batch_size", "max_prompt_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range (allowed: >= 1)")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    if not os.path.isdir(args.load):
        raise UserError(f"--load={args.load}: no such directory")
    examples = load_gsm8k_files(args.data, args.split, on_bad_row="error", prompt_key=args.prompt_key,
                                answer_key=args.answer_key, field="--data")
    if args.limit:
        examples = examples[:args.limit]
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, use_distributed_optimizer=False)
    info = init_runtime(parallel, seed=args.seed)
    megatron = (os.path.isfile(os.path.join(args.load, "metadata.json"))
                or os.path.isfile(os.path.join(args.load, "latest")))
    weights = resolve_checkpoint(args.load, "--load") if megatron else None
    hf_config = provider.load_hf_config(weights or args.load)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    chunks = provider.build_model_from_hf_config(hf_config, parallel, dtype)
    tmp = None
    if weights is None:  # an HF dir: the converter writes a layout-free megatron copy, then the one loader reads it
        tmp = broadcast_object(tempfile.mkdtemp(prefix="megagsm-eval-") if is_rank0() else None)
        weights = os.path.join(tmp, "mcore")
        convert_hf_to_mcore(args.load, weights, parallel, overwrite=True)
    load_mcore_checkpoint(chunks, weights)
    tokenizer = provider.load_tokenizer(weights if megatron else args.load)
    scorer = scorer_for(args.reward, "strict", [e.data_source for e in examples])
    sampling = EvalSampling(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    result = evaluate_model(chunks, examples, tokenizer, scorer, sampling, template=args.template,
                            max_prompt_len=args.max_prompt_len, truncation=args.truncation,
                            max_batch_size=args.batch_size, vocab_limit=provider.provider_for(hf_config).vocab_size,
                            keep_samples=args.output is not None)
    summary = {"accuracy": result.accuracy, "pass_at_k": result.pass_at_k, "maj_at_k": result.maj_at_k,
               "n": result.n, "num_prompts": result.num_prompts, "per_source": result.per_source,
               "load": args.load, "data": args.data}
    if is_rank0():
        if args.output:
            _write_results(args.output, result.samples, examples, tokenizer, args.template, summary)
        print(json.dumps(summary), flush=True)
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    shutdown_runtime()
    return 0


def _write_results(path: str, samples: list[dict], examples, tokenizer, template: str, summary: dict) -> None:
    from megagsm.data.prompts import build_example_prompt
    from megagsm.utils.atomic import write_text_atomic

    lines = []
    for s in samples:
        row = {"index": s["index"], "sample": s["sample"],
               "prompt": build_example_prompt(examples[s["index"]], tokenizer, template),
               "response": s["response"], "reward": s["reward"], "correct": s["correct"],
               "data_source": s["data_source"], "ground_truth": s["ground_truth"]}
        lines.append(json.dumps(row))
    lines.append(json.dumps(summary))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

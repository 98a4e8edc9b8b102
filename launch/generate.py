"""Sample completions from a converted megatron checkpoint with megagsm's in-process engine.

    python launch/generate.py --load CKPT --prompt "Natalia sold clips to..." --max-new-tokens 128
    torchrun --nproc-per-node 2 launch/generate.py --load CKPT --tp 2 --prompts in.jsonl \\
        --temperature 0.7 --top-p 0.95 --n 4 --seed 1 --stop "</answer>" --output out.jsonl

CKPT is a directory written by `python -m checkpoints_tools hf-to-mcore` (megatron torch_dist
weights + the HF config and tokenizer in CKPT/hf/); it loads at any --tp/--pp/--ep. Prompts: each
--prompt, or each line of --prompts FILE.jsonl: {"prompt": "..."} (also "text"/"question"), or
{"prompt_token_ids": [...]}; other fields (an "id") are copied to the output. With more ranks than
tp*pp the prompts are split over the data-parallel ranks. Output (one JSON line per completion, in
prompt order; stdout without --output): index, sample, prompt, completion, completion_token_ids,
logprobs (fp32 log-probs of the sampled tokens under the model), finish_reason.
Exit status: 0 done, 2 bad input (one line naming the flag/file/field, nothing written).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--load", required=True, help="megatron checkpoint dir from the converter CLI")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", help="JSONL file, one prompt per line")
    p.add_argument("--output", help="JSONL output file (written atomically); default stdout")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn with the tokenizer's chat template")
    for name in ("tp", "pp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1, help=f"{name} size (default 1)")
    p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size")
    p.add_argument("--sp", action="store_true",
                   help="sequence parallel (as trained; megatron requires it for MoE with --tp > 1)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    g.add_argument("--logprobs", choices=["raw", "processed", "none"], default="raw")
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="memory the KV cache may use (default: 90%% of free memory)")
    return p


def read_prompts(args) -> list[dict]:
    if args.prompt:
        return [{"prompt": text} for text in args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise BadInput(f"--prompts {path}: no such file")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BadInput(f"{path}:{lineno}: expected an object, got {type(rec).__name__}")
        if "prompt" not in rec:
            for alias in ("text", "question"):
                if alias in rec:
                    rec["prompt"] = rec[alias]
                    break
        if not isinstance(rec.get("prompt"), str) and not isinstance(rec.get("prompt_token_ids"), list):
            raise BadInput(f"{path}:{lineno}: needs a string 'prompt' (or 'text'/'question') or a "
                           f"list 'prompt_token_ids'")
        records.append(rec)
    if not records:
        raise BadInput(f"--prompts {path}: no prompts")
    return records


def tokenize(records, tokenizer, chat: bool) -> list[list[int]]:
    out = []
    for rec in records:
        if "prompt_token_ids" in rec:
            out.append([int(t) for t in rec["prompt_token_ids"]])
        elif chat:
            out.append(list(tokenizer.apply_chat_template(
                [{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True, tokenize=True)))
        else:
            out.append(tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"])
        if not out[-1]:
            raise BadInput(f"prompt {len(out) - 1} tokenizes to nothing")
    return out


def load_model(args, parallel, dtype):
    """The converter's provider API: HF config + tokenizer from CKPT/hf, weights from CKPT."""
    from megagsm.models.errors import ModelInputError
    from megagsm.checkpoint.model_weights import load_mcore_checkpoint
    from megagsm.models.provider import build_model_from_hf_config, load_hf_config, load_tokenizer, provider_for

    try:
        hf_config = load_hf_config(args.load)
        chunks = build_model_from_hf_config(hf_config, parallel, dtype)
        load_mcore_checkpoint(chunks, args.load)
        return chunks, load_tokenizer(args.load), provider_for(hf_config).vocab_size, hf_config
    except ModelInputError as e:
        raise BadInput(str(e)) from None


def eos_ids(tokenizer, hf_config) -> list[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, hf_config.get("eos_token_id")):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    return sorted(ids)


def write_jsonl(path, lines) -> None:
    if path is None:
        for line in lines:
            print(line)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records = read_prompts(args)
        if not Path(args.load).is_dir():
            raise BadInput(f"--load {args.load}: no such directory")
        from megagsm.generation.sampling import SamplingParams

        base = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              n=args.n, seed=args.seed, stop_strings=args.stop,
                              logprobs=args.logprobs)
    except (BadInput, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(args, records, base)


def run(args, records, base) -> int:
    import dataclasses

    import torch
    from megatron.core import parallel_state as ps

    from megagsm.config.parallel import ParallelConfig
    from megagsm.runtime.collectives import gather_objects
    from megagsm.generation import generate_batched
    from megagsm.runtime import init_runtime, shutdown_runtime

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sequence_parallel=args.sp)
    info = init_runtime(parallel, seed=args.seed)
    try:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
            args.dtype, torch.bfloat16 if info.device.type == "cuda" else torch.float32)
        try:
            chunks, tokenizer, vocab, hf_config = load_model(args, parallel, dtype)
            prompt_ids = tokenize(records, tokenizer, args.chat)
        except BadInput as e:
            if info.is_main:
                print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        params = dataclasses.replace(base, stop_token_ids=[] if args.no_eos else eos_ids(tokenizer, hf_config))
        mine = list(range(info.dp_rank, len(prompt_ids), info.dp_size))  # this DP rank's prompts
        budget = int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None
        out = generate_batched(chunks, [prompt_ids[i] for i in mine], params, tokenizer,
                               max_batch_size=args.max_batch_size, kv_cache_bytes=budget,
                               vocab_limit=vocab, pad_token_id=tokenizer.pad_token_id or 0)
        lines = []
        for j, reason in enumerate(out.finish_reasons):
            i = mine[out.prompt_index[j]]
            rec = dict(records[i])
            n = int(out.lengths[j])
            lines.append((i, j % params.n, json.dumps({
                **rec, "index": i, "sample": j % params.n, "completion": out.texts[j],
                "completion_token_ids": out.tokens[j, :n].tolist(),
                "logprobs": [round(x, 6) for x in out.logprobs[j, :n].tolist()],
                "finish_reason": reason,
            }, ensure_ascii=False)))
        if info.dp_size > 1:  # collect every DP rank's lines on the first rank of each group
            everyone = gather_objects(lines, ps.get_data_parallel_group())
            lines = [line for part in everyone for line in part]
        if info.is_main:
            write_jsonl(args.output, [line for _, _, line in sorted(lines)])
        return 0
    finally:
        shutdown_runtime()


if __name__ == "__main__":
    sys.exit(main())

"""Sample completions from a converted megatron checkpoint with megagsm's in-process engine.

    python launch/generate.py --load CKPT --prompt "Natalia sold clips to..." --max-new-tokens 128
    torchrun --nproc-per-node 2 launch/generate.py --load CKPT --tp 2 --prompts in.jsonl \\
        --temperature 0.7 --top-p 0.95 --n 4 --seed 1 --stop "</answer>" --output out.jsonl

CKPT is a directory written by `python -m checkpoints_tools hf-to-mcore` (megatron torch_dist
weights + the HF config and tokenizer in CKPT/hf/); it loads at any --tp/--pp/--ep. Prompts: each
--prompt, or each line of --prompts FILE.jsonl: {"prompt": "..."} (also "text"/"question"), or
{"prompt_token_ids": [...]}; other fields (an "id") are copied to the output. Text prompts are
encoded the way the trainers encode them: through a prompt template (--template; default: the one
recorded in the config.yaml a trainer saved beside the checkpoint, else the data default;
`--template none` for the text as given), with the tokenizer's chat template when it has one.
Token ids must lie in the vocabulary; a prompt longer than the context is refused or cut
(--truncation). With more ranks than
tp*pp the prompts are split over the data-parallel ranks. Output (one JSON line per completion, in
prompt order; stdout without --output): index, sample, prompt, completion, completion_token_ids,
logprobs (fp32 log-probs of the sampled tokens under the model), finish_reason.
Exit status: 0 done, 2 bad input (one line naming the flag/file/field, nothing written).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megagsm.errors import UserError, exit_on_user_error  # noqa: E402

NO_TEMPLATE = "none"     # --template none: the prompt text exactly as given


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--load", required=True, help="megatron checkpoint dir from the converter CLI")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", help="JSONL file, one prompt per line")
    p.add_argument("--output", help="JSONL output file (written atomically); default stdout")
    p.add_argument("--chat", action="store_true",
                   help="always wrap each prompt as a user turn with the tokenizer's chat template (default: "
                        "as the trainers do, when the tokenizer has one and a --template applies)")
    p.add_argument("--template", default=None,
                   help="prompt template applied to text prompts (megagsm.data.prompts: gsm8k_step_by_step, bare, "
                        "question_answer; 'none': the text as given). Default: data.prompt_template of the "
                        "config.yaml the trainer saved beside the checkpoint, else the data default")
    p.add_argument("--truncation", choices=["left", "right", "error"], default="error",
                   help="a prompt longer than the context (max_position_embeddings - --max-new-tokens): cut "
                        "its start (left), its end (right), or stop with an error naming it (default)")
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
    p.add_argument("--static-batches", action="store_true",
                   help="decode prompts in fixed groups, each until its longest row ends (default: continuous "
                        "batching, waiting prompts take the rows finished sequences free)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="memory the KV cache may use (default: 90%% of free memory)")
    return p


def read_prompts(args) -> tuple[list[dict], list[str]]:
    """The prompt records and where each came from ("FILE:LINE" or "--prompt N")."""
    if args.prompt:
        return [{"prompt": text} for text in args.prompt], [f"--prompt {i}" for i in range(1, len(args.prompt) + 1)]
    path = Path(args.prompts)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save the prompts file as UTF-8") from None
    records, origins = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object, got {type(rec).__name__}")
        if "prompt" not in rec:
            for alias in ("text", "question"):
                if alias in rec:
                    rec["prompt"] = rec[alias]
                    break
        if not isinstance(rec.get("prompt"), str) and not isinstance(rec.get("prompt_token_ids"), list):
            raise UserError(f"{where}: needs a string 'prompt' (or 'text'/'question') or a "
                            f"list 'prompt_token_ids'")
        records.append(rec)
        origins.append(where)
    if not records:
        raise UserError(f"--prompts {path}: no prompts")
    return records, origins


def check_token_ids(ids, vocab_size: int, where: str) -> list[int]:
    """prompt_token_ids must be integers in [0, vocab_size)."""
    if not ids:
        raise UserError(f"{where}: 'prompt_token_ids' is empty")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise UserError(f"{where}: prompt_token_ids[{i}] = {t!r} is not an integer token id")
        if not 0 <= t < vocab_size:
            raise UserError(f"{where}: prompt_token_ids[{i}] = {t} is out of range: the model's "
                            f"vocabulary is 0..{vocab_size - 1}")
    return list(ids)


def run_dirs(load_dir: Path) -> list[Path]:
    """Where a trainer's config.yaml may sit for this checkpoint: in it, or in the run's output dir
    when it is OUT/checkpoints or OUT/checkpoints/iter_N (the trainers' layout)."""
    load_dir = load_dir.absolute()
    out = [load_dir]
    if load_dir.name == "checkpoints":
        out.append(load_dir.parent)
    elif load_dir.name.startswith("iter_") and load_dir.parent.name == "checkpoints":
        out.append(load_dir.parent.parent)
    return out


def saved_template(load_dir: Path) -> tuple[str, Path] | None:
    """data.prompt_template of the config.yaml the trainer saved for this checkpoint (see run_dirs),
    with the file it came from."""
    from omegaconf import OmegaConf

    for d in run_dirs(load_dir):
        path = d / "config.yaml"
        if path.is_file():
            try:
                name = OmegaConf.select(OmegaConf.load(path), "data.prompt_template")
            except Exception as e:  # noqa: BLE001 - any unreadable YAML is the same user error
                raise UserError(f"{path}: unreadable config ({type(e).__name__}: {e}); pass --template") from None
            return (str(name), path) if name is not None else None
    return None


def resolve_template(args) -> str:
    """--template, else the trainer's recorded template, else the data default; 'none' = no template."""
    from megagsm.config.data import DataConfig
    from megagsm.data.prompts import DEFAULT_TEMPLATE, list_templates

    known = list_templates()
    if args.template is not None:
        name, source = args.template, "--template"
    else:
        found = saved_template(Path(args.load))
        name, source = (found[0], f"{found[1]} (data.prompt_template)") if found else (DataConfig.prompt_template,
                                                                                         "the data default")
    if name == "default":  # DataConfig's placeholder for the project-wide default template
        name = DEFAULT_TEMPLATE
    if name != NO_TEMPLATE and name not in known:
        raise UserError(f"{source}: unknown prompt template {name!r}; known: {', '.join(known)}, {NO_TEMPLATE}")
    return name


def tokenize(records, origins, tokenizer, template: str, chat: bool, vocab_size: int) -> list[list[int]]:
    """Token ids per record: prompt_token_ids as given (checked), text through the template the way
    the trainers encode prompts (megagsm.data.prompts.encode_prompt)."""
    from megagsm.data.prompts import encode_prompt

    out = []
    for rec, where in zip(records, origins):
        if "prompt_token_ids" in rec:
            out.append(check_token_ids(rec["prompt_token_ids"], vocab_size, where))
            continue
        if template != NO_TEMPLATE:
            ids = encode_prompt(rec["prompt"], tokenizer, template, use_chat_template="always" if chat else "auto")
        elif chat:
            ids = list(tokenizer.apply_chat_template(
                [{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True, tokenize=True))
        else:
            ids = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
        if not ids:
            raise UserError(f"{where}: the prompt tokenizes to nothing with the checkpoint's tokenizer")
        out.append(list(ids))
    return out


def fit_context(prompt_ids, origins, hf_config: dict, max_new_tokens: int, truncation: str) -> list[list[int]]:
    """Prompts cut (or refused) to max_position_embeddings - max_new_tokens tokens."""
    limit = hf_config.get("max_position_embeddings")
    if not isinstance(limit, int):
        return prompt_ids
    room = limit - max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt: the model's "
                        f"max_position_embeddings is {limit}")
    out = []
    for ids, where in zip(prompt_ids, origins):
        if len(ids) > room:
            if truncation == "error":
                raise UserError(f"{where}: the prompt has {len(ids)} tokens, the context allows {room} "
                                f"(max_position_embeddings {limit} - --max-new-tokens {max_new_tokens}); "
                                "pass --truncation left|right, or fewer --max-new-tokens")
            ids = ids[len(ids) - room:] if truncation == "left" else ids[:room]
        out.append(ids)
    return out


def eos_ids(tokenizer, hf_config) -> list[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, hf_config.get("eos_token_id")):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    return sorted(ids)


def check_output_path(path) -> None:
    """Fail before generating when the output cannot be written (a file in the way, read-only dir)."""
    import os

    if path is None:
        return
    out = Path(path).absolute()
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--output {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"--output {path}: {parent} is not writable")
            return


def write_jsonl(path, lines) -> None:
    if path is None:
        for line in lines:
            print(line)
        return
    from megagsm.utils.atomic import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def main(argv=None) -> int:
    """Everything the user gave is checked here, on every rank alike and before any process group
    exists (prompts, token ids, template, context, output path); bad input raises UserError."""
    from megagsm.utils.logging import filter_cli_warnings

    args = build_parser().parse_args(argv)
    filter_cli_warnings()
    import megagsm.checkpoint  # noqa: F401  (checkpoint reads refuse pickled code: megagsm.checkpoint.safe_pickle)
    from megagsm.models.hf_config import load_hf_config

    records, origins = read_prompts(args)
    if not Path(args.load).is_dir():
        raise UserError(f"--load {args.load}: no such directory")
    check_output_path(args.output)
    from megagsm.generation.sampling import SamplingParams

    try:
        base = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              n=args.n, seed=args.seed, stop_strings=args.stop, logprobs=args.logprobs)
    except ValueError as e:
        raise UserError(str(e)) from None
    from megagsm.models.provider import load_tokenizer, provider_for

    hf_config = load_hf_config(args.load)
    vocab = provider_for(hf_config).vocab_size
    tokenizer = load_tokenizer(args.load)
    prompt_ids = tokenize(records, origins, tokenizer, resolve_template(args), args.chat, vocab)
    prompt_ids = fit_context(prompt_ids, origins, hf_config, args.max_new_tokens, args.truncation)
    return run(args, records, prompt_ids, base, hf_config, tokenizer, vocab)


def run(args, records, prompt_ids, base, hf_config, tokenizer, vocab) -> int:
    import dataclasses

    import torch
    from megatron.core import parallel_state as ps

    from megagsm.checkpoint.integrity import verify_checkpoint_collective
    from megagsm.config.parallel import ParallelConfig
    from megagsm.runtime.collectives import gather_objects
    from megagsm.generation.refill import generate_many
    from megagsm.checkpoint.model_weights import load_mcore_checkpoint
    from megagsm.models.provider import build_model_from_hf_config
    from megagsm.runtime import init_runtime, shutdown_runtime

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sequence_parallel=args.sp)
    info = init_runtime(parallel, seed=args.seed)
    # the process group is shut down after a success only: after an error other ranks may be gone
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype, torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    verify_checkpoint_collective(args.load)  # whole and unaltered before any file of it is opened
    chunks = build_model_from_hf_config(hf_config, parallel, dtype)
    load_mcore_checkpoint(chunks, args.load)
    params = dataclasses.replace(base, stop_token_ids=[] if args.no_eos else eos_ids(tokenizer, hf_config))
    mine = list(range(info.dp_rank, len(prompt_ids), info.dp_size))  # this DP rank's prompts
    budget = int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None
    out = generate_many(chunks, [prompt_ids[i] for i in mine], params, tokenizer,
                        continuous_batching=not args.static_batches, max_batch_size=args.max_batch_size,
                        kv_cache_bytes=budget, vocab_limit=vocab, pad_token_id=tokenizer.pad_token_id or 0)
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
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))

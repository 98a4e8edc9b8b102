"""The GSPO bench's workload: the run config, the two paths it compares and forced response lengths
(used by bench/gspo_step.py).

Paths. The "new" path is the config as the trainer defaults it; the baseline is today's padded, static
path: `train.max_tokens_per_microbatch=0` (fixed rows padded to the longest sequence) and
`generation.continuous_batching=false` (one engine call per group of prompts). Each knob is set only when
the config has the field, so before those features exist both paths are the same run (speedup ~1).

Forced lengths. `--lengths skewed` stops sequence j with EOS after `response_lengths[j]` tokens (the
engine's own argument, on every megagsm.generation entry that accepts it), drawn from a lognormal whose
median is a quarter of the cap and whose top 5% reach the cap: a GSM8K-like long tail on any weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import sys

import torch

# the baseline's settings, per config field (section, field): today's padded rows and static batching
BASELINE_KNOBS = {("train", "max_tokens_per_microbatch"): "0", ("generation", "continuous_batching"): "false"}
# lognormal sigma putting the cap (4x the median) at the 95th percentile: ln 4 / z_0.95
SKEW_SIGMA = math.log(4.0) / 1.6448536


def skewed_lengths(count: int, cap: int, seed: int) -> list[int]:
    """`count` response lengths in [1, cap]: median ~cap/4, ~5% at the cap (a long tail)."""
    g = torch.Generator().manual_seed(seed)
    drawn = torch.exp(math.log(cap / 4.0) + SKEW_SIGMA * torch.randn(count, generator=g, dtype=torch.float64))
    return drawn.round().clamp(1, cap).long().tolist()


def available_knobs(cfg) -> dict[str, str]:
    """The baseline's overrides ("section.field": value) for the knobs this config has."""
    return {f"{section}.{name}": value for (section, name), value in BASELINE_KNOBS.items()
            if name in {f.name for f in dataclasses.fields(getattr(cfg, section))}}


def data_overrides(args, synthetic_train: str | None) -> list[str]:
    """data.* for --data (a parquet or jsonl file, read as the trainer reads it) or the synthetic set."""
    path = args.data or synthetic_train
    source = "parquet" if path.endswith(".parquet") else "jsonl"
    out = [f"data.source={source}", f"data.train_path={path}", f"data.prompt_template={args.template}",
           f"data.max_prompt_len={args.max_prompt_len}", f"data.seq_length={args.max_prompt_len + args.new_tokens}",
           f"data.max_response_len={args.new_tokens}"]
    if args.prompt_key:
        out.append(f"data.prompt_key={args.prompt_key}")
    if args.answer_key:
        out.append(f"data.answer_key={args.answer_key}")
    return out


def model_overrides(args, shape: tuple, base_dir: str | None) -> list[str]:
    """model.* for --hf-dir (HF weights, converted as model.init=hf does), --load (a megagsm
    checkpoint; architecture and tokenizer from its hf/ side files unless --hf-dir is given) or random
    weights of --shape on the synthetic tokenizer (`base_dir`)."""
    out = [f"model.dtype={args.dtype}"]
    if args.load:
        from megagsm.checkpoint.manager import resolve_checkpoint

        arch = args.hf_dir or os.path.join(resolve_checkpoint(args.load, "--load"), "hf")
        return out + ["model.init=random", f"model.hf_dir={arch}", f"model.load={args.load}"]
    if args.hf_dir:
        return out + ["model.init=hf", f"model.hf_dir={args.hf_dir}"]
    hidden, layers, heads, kv, ffn, vocab, tied = shape
    return out + ["model.init=random", f"model.hf_dir={base_dir}", f"model.hidden_size={hidden}",
                  f"model.num_layers={layers}", f"model.num_attention_heads={heads}", f"model.num_query_groups={kv}",
                  f"model.ffn_hidden_size={ffn}", f"model.vocab_size={vocab}",
                  f"model.tie_word_embeddings={str(tied).lower()}", "model.max_position_embeddings=4096"]


def run_overrides(args, out_dir: str) -> list[str]:
    """Everything but model.* and data.*: the step's shapes and optimizer, no eval, no export."""
    return [
        "algorithm.name=gspo", f"optim.lr={args.lr}", "optim.weight_decay=0.1", "optim.clip_grad=1.0",
        f"train.micro_batch_size={args.micro_batch_size}", "train.eval_at_start=false", "train.eval_accuracy=false",
        "train.export_hf=false", f"train.output_dir={out_dir}", "train.resume=none",
        f"generation.max_new_tokens={args.new_tokens}", f"generation.max_batch_size={args.gen_batch}",
        "generation.temperature=1.0",
        f"algorithm.gspo.n_rollouts={args.n}", f"algorithm.gspo.prompts_per_step={args.prompts}",
        f"algorithm.gspo.mini_batches={args.mini_batches}", "algorithm.gspo.filter_zero_std_groups=false",
        *args.override,
    ]


def engine_takes_lengths() -> bool:
    """Whether megagsm.generation's engine has the `response_lengths` argument."""
    from megagsm.generation import engine

    return "response_lengths" in inspect.signature(engine.generate).parameters


def forcing_entries(modules) -> list[tuple[object, str]]:
    """(module, name) pairs bound to megagsm.generation functions that take `response_lengths`:
    by name, or through **kwargs passed on to the engine when the engine has it."""
    engine = None
    entries = []
    for module in modules:
        for name, value in vars(module).items():
            if not (inspect.isfunction(value) and value.__module__.startswith("megagsm.generation")):
                continue
            params = inspect.signature(value).parameters
            if "response_lengths" not in params:
                if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                    continue
                engine = engine_takes_lengths() if engine is None else engine
                if not engine:
                    continue
            entries.append((module, name))
    return entries


def rl_modules() -> list:
    """The loaded megagsm.rl modules: where the trainer calls generation from (patching the
    generation package itself would also reach its internal per-group calls)."""
    return [m for name, m in list(sys.modules.items()) if name.startswith("megagsm.rl") and m is not None]


@contextlib.contextmanager
def forced_lengths(modules, lengths_for):
    """While active, every generation entry the given modules call (see forcing_entries) gets
    `response_lengths=lengths_for(prompts, params)`; SystemExit when there is none."""
    entries = forcing_entries(modules)
    if not entries:
        raise SystemExit("--lengths skewed needs megagsm.generation's `response_lengths` argument "
                         "(no generation entry the trainer calls takes it)")
    originals = [(module, name, getattr(module, name)) for module, name in entries]

    def forcing(fn):
        @functools.wraps(fn)
        def call(model, prompts, params, *a, **kw):
            kw.setdefault("response_lengths", lengths_for(prompts, params))
            return fn(model, prompts, params, *a, **kw)
        return call

    for module, name, fn in originals:
        setattr(module, name, forcing(fn))
    try:
        yield [name for _, name in entries]
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)

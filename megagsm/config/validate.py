"""Whole-config checks that need the world size: run them before any process group starts."""
from __future__ import annotations

import json
import logging
import os

from .errors import ConfigError
from .layout import model_problems, parallel_problems
from .model import REQUIRED_RANDOM_SIZES
from .schema import RunConfig

log = logging.getLogger(__name__)


# levels of megagsm.data.synthetic (config sits below data in the layering, so the count is
# repeated here; tests/test_config.py checks that the two agree)
SYNTHETIC_LEVELS = 5


def planned_world_size(cfg: RunConfig, launch_world_size: int | None) -> int | None:
    """The world size the layout is checked against: parallel.world_size when set, else the launch's
    (None: not known, e.g. --print-config under plain python for a recipe that sets none)."""
    return cfg.parallel.world_size or launch_world_size


def launch_problems(cfg: RunConfig, launch_world_size: int) -> list[str]:
    """A set parallel.world_size must be what the launch gives."""
    planned = cfg.parallel.world_size
    if planned and planned != launch_world_size:
        return [f"parallel.world_size={planned} but this launch has WORLD_SIZE={launch_world_size} "
                f"(launch {planned} processes, e.g. torchrun --nproc-per-node {planned}, or set "
                f"parallel.world_size={launch_world_size}, or 0 for whatever the launch gives)"]
    return []


def validate(cfg: RunConfig, world_size: int | None, *, launched: bool = False) -> None:
    """Raise ConfigError listing every problem (one line, '; '-separated), each naming its field.
    The layout is checked against parallel.world_size when set, else against `world_size`; None
    skips the checks that need a world size. launched: `world_size` is the real launch's, which
    must then equal a set parallel.world_size."""
    problems = launch_problems(cfg, world_size) if launched and world_size is not None else []
    world_size = planned_world_size(cfg, world_size)
    problems += parallel_problems(cfg.parallel, world_size)
    m = cfg.model
    problems += model_problems(cfg.parallel, m.num_layers, m.num_attention_heads, m.num_query_groups,
                               _num_experts(cfg), m.ffn_hidden_size)
    problems += _model_source_problems(cfg)
    problems += _batch_problems(cfg, world_size) if world_size is not None else []
    problems += _data_problems(cfg)
    problems += _packing_problems(cfg)
    problems += _range_problems(cfg)
    problems += _cuda_graph_problems(cfg, check_device=launched)
    if cfg.algorithm.name == "gspo":
        problems += cfg.algorithm.gspo.problems(cfg.generation.max_new_tokens)
    try:
        cfg.model.moe.validate()
    except ValueError as e:  # its messages name the model.moe.* field
        problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.parallel.sequence_parallel and not cfg.parallel.sequence_parallel_active:
        log.warning("parallel.sequence_parallel=true is ignored at parallel.tp=1 (as Megatron-LM does)")


def _num_experts(cfg: RunConfig) -> int | None:
    """model.num_experts, else the expert count of hf_dir's config.json (None there: dense). A recipe
    whose hf_dir cannot be read here (a placeholder, or a path that only exists on the cluster) gets its
    expert-parallel size taken on trust; the model builder checks it against the real config."""
    m, p = cfg.model, cfg.parallel
    if m.num_experts is not None or not m.hf_dir:
        return m.num_experts
    try:
        with open(os.path.join(m.hf_dir, "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return p.ep if p.ep > 1 else None
    for key in ("num_experts", "n_routed_experts", "num_local_experts"):
        if isinstance(hf.get(key), int) and hf[key] > 0:
            return hf[key]
    return None


def _model_source_problems(cfg: RunConfig) -> list[str]:
    m = cfg.model
    if m.init == "hf":
        problems = [] if m.hf_dir else ["model.hf_dir must be set when model.init='hf' "
                                        "(or use model.init=random with model sizes)"]
        problems += [f"model.{name}={value} is set but model.init='hf' takes sizes from hf_dir "
                     "(allowed only with model.init=random)" for name, value in m.explicit_sizes().items()]
        return problems
    if m.hf_dir:
        return []  # random weights, sizes from hf_dir's config.json (explicit ones override)
    problems = [f"model.{name} must be set when model.init='random' and model.hf_dir is unset"
                for name in REQUIRED_RANDOM_SIZES if getattr(m, name) is None]
    if m.family is None:
        problems.append("model.family must be set when model.init='random' and model.hf_dir is unset")
    return problems


def _batch_problems(cfg: RunConfig, world_size: int) -> list[str]:
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tp * p.pp * p.cp
    if world_size < 1 or model_parallel < 1 or world_size % model_parallel or t.micro_batch_size < 1:
        return []  # reported elsewhere
    dp = world_size // model_parallel
    step = t.micro_batch_size * dp
    where = f"train.micro_batch_size*dp={step} (micro_batch_size={t.micro_batch_size}, dp={dp})"
    if cfg.algorithm.name == "sft":
        if t.global_batch_size >= 1 and t.global_batch_size % step:
            return [f"train.global_batch_size={t.global_batch_size} is not a multiple of {where}"
                    f" (allowed: {step}, {2 * step}, {3 * step}, ...)"]
        return []
    g = cfg.algorithm.gspo
    if g.n_rollouts < 1 or g.prompts_per_step < 1 or g.mini_batches < 1:
        return []  # reported by the range checks
    rollouts = g.rollouts_per_step()
    if rollouts % g.mini_batches:
        return [f"algorithm.gspo.mini_batches={g.mini_batches} does not divide "
                f"n_rollouts*prompts_per_step={rollouts}"]
    per_update = rollouts // g.mini_batches
    if per_update % step:
        return [f"algorithm.gspo sequences per optimizer step (n_rollouts*prompts_per_step/mini_batches"
                f"={per_update}) is not a multiple of {where}"]
    return []


def _data_problems(cfg: RunConfig) -> list[str]:
    d, p, m = cfg.data, cfg.parallel, cfg.model
    problems = []
    if d.source in ("jsonl", "parquet", "hf") and not d.train_path:
        problems.append(f"data.train_path must be set when data.source='{d.source}'")
    if d.max_prompt_len + d.max_response_len > d.seq_length:
        problems.append(f"data.max_prompt_len+max_response_len={d.max_prompt_len + d.max_response_len} "
                        f"exceeds data.seq_length={d.seq_length}")
    if cfg.algorithm.name == "gspo" and d.max_prompt_len + cfg.generation.max_new_tokens > d.seq_length:
        problems.append(f"data.max_prompt_len+generation.max_new_tokens="
                        f"{d.max_prompt_len + cfg.generation.max_new_tokens} exceeds data.seq_length={d.seq_length}")
    if m.max_position_embeddings is not None and d.seq_length > m.max_position_embeddings:
        problems.append(f"data.seq_length={d.seq_length} exceeds model.max_position_embeddings="
                        f"{m.max_position_embeddings}")
    if p.cp > 1 and d.seq_length % (2 * p.cp):
        # megatron's context parallelism splits each sequence into 2*cp load-balanced chunks
        problems.append(f"data.seq_length={d.seq_length} must be a multiple of 2*parallel.cp={2 * p.cp}")
    if p.cp > 1 and d.pack_sequences:
        # packed rows go in as THD documents, which megagsm does not split over context-parallel ranks
        problems.append(f"data.pack_sequences=true needs parallel.cp=1 (got {p.cp}): packed rows are fed "
                        "as THD documents, not split over context-parallel ranks; use data.pack_sequences=false")
    if p.sequence_parallel_active and d.seq_length % p.tp:
        problems.append(f"data.seq_length={d.seq_length} must be a multiple of parallel.tp={p.tp} "
                        "with sequence_parallel")
    return problems


def _packing_problems(cfg: RunConfig) -> list[str]:
    """A GSPO token budget must hold the longest sequence the model can be fed (prompt + response,
    minus the last token, which is only a label)."""
    budget = cfg.train.max_tokens_per_microbatch
    if cfg.algorithm.name != "gspo":
        return []
    if cfg.train.share_prompts:
        if budget == 0:
            return ["train.share_prompts=true needs packed microbatches: train.max_tokens_per_microbatch=0 "
                    "is padded rows (use null or a token budget, or share_prompts=null|false)"]
        if cfg.algorithm.gspo.routing_replay != "none":
            return [f"train.share_prompts=true: routing replay (algorithm.gspo.routing_replay="
                    f"{cfg.algorithm.gspo.routing_replay}) needs every sequence's own tokens; use share_prompts=null|false"]
    if budget is None or budget == 0:
        return []
    longest = cfg.data.max_prompt_len + cfg.generation.max_new_tokens - 1
    if budget < 0 or budget < longest:
        return [f"train.max_tokens_per_microbatch={budget} is smaller than the longest sequence "
                f"(data.max_prompt_len+generation.max_new_tokens-1={longest}); allowed: >= {longest}, "
                "0 (padded rows) or null (auto)"]
    return []


def _cuda_graph_problems(cfg: RunConfig, check_device: bool) -> list[str]:
    """generation.cuda_graphs: what the captured decode step supports. The device is checked on the
    real launch only (a recipe may be printed or checked on a machine without the GPU)."""
    if not cfg.generation.cuda_graphs:
        return []
    problems = []
    if not cfg.generation.continuous_batching:
        problems.append("generation.cuda_graphs=true needs generation.continuous_batching=true")
    if cfg.parallel.pp > 1:
        problems.append(f"generation.cuda_graphs=true needs parallel.pp=1 (got {cfg.parallel.pp}: pipeline "
                        "sends are not captured)")
    if _num_experts(cfg):
        problems.append("generation.cuda_graphs=true needs a dense model (MoE token exchanges are not captured)")
    if check_device:
        import torch

        if not torch.cuda.is_available():
            problems.append("generation.cuda_graphs=true needs a CUDA device (torch.cuda.is_available() is "
                            "false here); set it false")
    return problems


def _range_problems(cfg: RunConfig) -> list[str]:
    """Plain bounds, as (dotted name, value, ok?, allowed) rows."""
    o, t, d, gen, g = cfg.optim, cfg.train, cfg.data, cfg.generation, cfg.algorithm.gspo
    rows = [
        ("parallel.world_size", cfg.parallel.world_size, cfg.parallel.world_size >= 0,
         ">= 0 (0: whatever the launch gives)"),
        ("optim.lr", o.lr, o.lr >= 0, ">= 0"),
        ("optim.min_lr", o.min_lr, 0 <= o.min_lr <= o.lr, f"0 <= min_lr <= optim.lr={o.lr}"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.adam_beta1", o.adam_beta1, 0 <= o.adam_beta1 < 1, "[0, 1)"),
        ("optim.adam_beta2", o.adam_beta2, 0 <= o.adam_beta2 < 1, "[0, 1)"),
        ("optim.adam_eps", o.adam_eps, o.adam_eps > 0, "> 0"),
        ("optim.clip_grad", o.clip_grad, o.clip_grad >= 0, ">= 0 (0 disables)"),
        ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
        ("optim.lr_decay_steps", o.lr_decay_steps, o.lr_decay_steps is None or o.lr_decay_steps >= 1,
         ">= 1 or null"),
        ("train.global_batch_size", t.global_batch_size, t.global_batch_size >= 1, ">= 1"),
        ("train.micro_batch_size", t.micro_batch_size, t.micro_batch_size >= 1, ">= 1"),
        ("train.train_steps", t.train_steps, t.train_steps >= 0, ">= 0"),
        ("train.eval_interval", t.eval_interval, t.eval_interval >= 0, ">= 0 (0: only at the end)"),
        ("train.save_interval", t.save_interval, t.save_interval >= 0, ">= 0 (0: only at the end)"),
        ("train.keep_last_n", t.keep_last_n, t.keep_last_n >= 0, ">= 0 (0 keeps all)"),
        ("train.log_interval", t.log_interval, t.log_interval >= 1, ">= 1"),
        ("train.eval_max_examples", t.eval_max_examples, t.eval_max_examples >= 0, ">= 0 (0: all)"),
        ("train.loss_chunk_size", t.loss_chunk_size, t.loss_chunk_size >= 1, ">= 1"),
        ("train.eval_n", t.eval_n, t.eval_n >= 1, ">= 1"),
        ("train.eval_temperature", t.eval_temperature, t.eval_temperature >= 0, ">= 0 (0: greedy)"),
        ("train.eval_top_p", t.eval_top_p, 0 < t.eval_top_p <= 1, "(0, 1]"),
        ("train.resume", t.resume, t.resume in ("auto", "none") or os.path.exists(t.resume),
         "'auto', 'none' or an existing checkpoint path"),
        ("data.max_prompt_len", d.max_prompt_len, d.max_prompt_len >= 1, ">= 1"),
        ("data.max_response_len", d.max_response_len, d.max_response_len >= 1, ">= 1"),
        ("data.seq_length", d.seq_length, d.seq_length >= 1, ">= 1"),
        ("data.n_train", d.n_train, d.n_train >= 1, ">= 1"),
        ("data.n_test", d.n_test, d.n_test >= 0, ">= 0"),
        ("data.difficulty", d.difficulty, 0 <= d.difficulty < SYNTHETIC_LEVELS,
         f"0 to {SYNTHETIC_LEVELS - 1} (0: easiest)"),
        ("generation.max_new_tokens", gen.max_new_tokens, gen.max_new_tokens >= 1, ">= 1"),
        ("generation.temperature", gen.temperature, gen.temperature >= 0, ">= 0 (0: greedy)"),
        ("generation.top_k", gen.top_k, gen.top_k >= 0, ">= 0 (0: off)"),
        ("generation.top_p", gen.top_p, 0 < gen.top_p <= 1, "(0, 1]"),
        ("generation.n_samples", gen.n_samples, gen.n_samples >= 1, ">= 1"),
        ("generation.max_batch_size", gen.max_batch_size, gen.max_batch_size >= 1, ">= 1"),
    ]
    if t.lora.enabled:
        lo = t.lora
        rows += [
            ("train.lora.rank", lo.rank, lo.rank >= 1, ">= 1"),
            ("train.lora.alpha", lo.alpha, lo.alpha > 0, "> 0"),
            ("train.lora.dropout", lo.dropout, 0 <= lo.dropout < 1, "[0, 1)"),
            ("train.lora.targets", lo.targets, len(lo.targets) > 0, "a non-empty list of module names"),
        ]
    if cfg.algorithm.name == "gspo":
        rows += [
            ("algorithm.gspo.n_rollouts", g.n_rollouts, g.n_rollouts >= 2,
             ">= 2 (group-relative advantages need a group)"),
            ("algorithm.gspo.prompts_per_step", g.prompts_per_step, g.prompts_per_step >= 1, ">= 1"),
            ("algorithm.gspo.mini_batches", g.mini_batches, g.mini_batches >= 1, ">= 1"),
            ("algorithm.gspo.ppo_epochs", g.ppo_epochs, g.ppo_epochs >= 1, ">= 1"),
            ("algorithm.gspo.clip_ratio_low", g.clip_ratio_low, 0 <= g.clip_ratio_low < 1, "[0, 1)"),
            ("algorithm.gspo.clip_ratio_high", g.clip_ratio_high, g.clip_ratio_high >= 0, ">= 0"),
            ("algorithm.gspo.kl_coef", g.kl_coef, g.kl_coef >= 0, ">= 0"),
        ]
    return [f"{name}={value!r} is out of range (allowed: {allowed})"
            for name, value, ok, allowed in rows if not ok]



def _looks_local(path: str) -> bool:
    """A filesystem path rather than a Hugging Face Hub id ("org/name" stays a Hub id)."""
    return os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.count("/") > 1


def path_problems(cfg: RunConfig) -> list[str]:
    """Local paths the run reads must exist (checked at launch, not by --print-config: a recipe's
    placeholders exist only on the cluster). Hub ids are left to the loaders."""
    m = cfg.model
    problems = []
    for name, value in (("model.hf_dir", m.hf_dir), ("model.tokenizer", m.tokenizer)):
        if value and _looks_local(value) and not os.path.isdir(os.path.expanduser(value)):
            what = "no such directory" if not os.path.exists(os.path.expanduser(value)) else "not a directory"
            problems.append(f"{name}={value}: {what} (a local HF model dir with config.json and tokenizer "
                            "files, or a Hugging Face Hub id like Qwen/Qwen2.5-0.5B)")
    if m.hf_dir and os.path.isdir(os.path.expanduser(m.hf_dir)) and m.init in ("hf", "random") \
            and not os.path.isfile(os.path.join(os.path.expanduser(m.hf_dir), "config.json")):
        problems.append(f"model.hf_dir={m.hf_dir}: no config.json there (not an HF model directory)")
    return problems


def check_paths(cfg: RunConfig) -> None:
    """ConfigError naming each missing local input path (see path_problems)."""
    problems = path_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))

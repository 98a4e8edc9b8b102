"""Per-rank memory plan of a run config: static bytes (exact, see params.py), training and generation
peaks (estimates, see activations.py), for the worst pipeline stage."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from megagsm.config.schema import RunConfig
from megagsm.config.errors import ConfigError
from megagsm.errors import UserError
from megagsm.plan import activations as act
from megagsm.plan.params import ddp_buffer, is_moe_layer, layer_ranges, rank_parameters

GIB = 1024**3
KNOWN_MODELS = Path(__file__).with_name("known_models")
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 2}   # auto plans for the GPU: bf16
_WORLD_SIZE_COMMENT = re.compile(r"^#\s*world_size:\s*(\d+)\s*$", re.MULTILINE)


def recipe_world_size(path: str | None) -> int | None:
    """The `# world_size: N` comment of a recipe file (recipes written before parallel.world_size)."""
    if path is None:
        return None
    found = _WORLD_SIZE_COMMENT.findall(Path(path).read_text(encoding="utf-8"))
    return int(found[0]) if found else None


def resolve_world_size(cfg: RunConfig, recipe: str | None, flag: int | None) -> int:
    """parallel.world_size if the config has it, else the recipe's comment, else --world-size; a
    --world-size that contradicts the recipe is an error."""
    stated = getattr(cfg.parallel, "world_size", None) or recipe_world_size(recipe)
    if stated and flag and stated != flag:
        raise ConfigError(f"--world-size {flag} contradicts the recipe's world size {stated} "
                          "(parallel.world_size or its '# world_size:' comment)")
    size = stated or flag
    if not size:
        raise ConfigError("world size unknown: pass --world-size N (the recipe has neither "
                          "parallel.world_size nor a '# world_size: N' comment)")
    return int(size)


def known_model_dir(hf_dir: str) -> Path | None:
    """The shipped architecture whose name starts the hf_dir's last component (Qwen2.5-3B-Instruct ->
    Qwen2.5-3B), longest name first."""
    base = Path(hf_dir.rstrip("/")).name.lower()
    names = sorted((p.name for p in KNOWN_MODELS.iterdir() if (p / "config.json").is_file()), key=len, reverse=True)
    for name in names:
        if base.startswith(name.lower()):
            return KNOWN_MODELS / name
    return None


def resolve_hf_config(cfg: RunConfig) -> tuple[dict, str]:
    """(HF config dict, where it came from): model.hf_dir when it exists, else a known architecture."""
    from megagsm.models.hf_config import load_hf_config

    m = cfg.model
    if m.init == "random" and not m.hf_dir:
        from megagsm.train.model import hf_config_for
        return hf_config_for(m), "model.* size fields"
    if not m.hf_dir:
        raise ConfigError("model.hf_dir is not set: the planner needs the model's config.json")
    if Path(m.hf_dir).is_dir():
        hf = load_hf_config(m.hf_dir)
        source = m.hf_dir
    else:
        known = known_model_dir(m.hf_dir)
        if known is None:
            shipped = ", ".join(sorted(p.name for p in KNOWN_MODELS.iterdir()))
            raise ConfigError(f"model.hf_dir={m.hf_dir}: no such directory and no known architecture by that "
                              f"name (known: {shipped})")
        hf, source = load_hf_config(known), f"{known.name} (megagsm/plan/known_models)"
    sizes = m.explicit_sizes()
    if sizes:
        from megagsm.train.model import HF_SIZE_KEYS
        hf = {**hf, **{HF_SIZE_KEYS[k]: v for k, v in sizes.items()}}
    return hf, source


@dataclass
class StagePlan:
    stage: int
    params: int = 0                 # bytes, per rank
    grads: int = 0
    optimizer: int = 0
    activations: float = 0.0
    logits: float = 0.0
    kv_cache: int = 0
    generation_work: float = 0.0
    counts: dict = field(default_factory=dict)   # parameter element counts

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def train_peak(self) -> float:
        return self.static + self.activations + self.logits

    def generate_peak(self, released: bool) -> float:
        resident = self.params if released else self.static
        return resident + self.kv_cache + self.generation_work


@dataclass
class Plan:
    stages: list[StagePlan]
    world_size: int
    dp: int
    expert_dp: int
    source: str
    release: bool                   # grads/optimizer released while generating (as configured)
    gpu_memory_gib: float
    notes: list[str]

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: max(s.train_peak, s.generate_peak(self.release)))

    def summary(self) -> dict:
        w = self.worst
        peak = max(w.train_peak, w.generate_peak(self.release))
        return {
            "static_gib": round(w.static / GIB, 3),
            "train_peak_gib": round(w.train_peak / GIB, 3),
            "generate_peak_gib": round(w.generate_peak(self.release) / GIB, 3),
            "generate_peak_resident_gib": round(w.generate_peak(False) / GIB, 3),
            "generate_peak_released_gib": round(w.generate_peak(True) / GIB, 3),
            "release_training_memory": self.release,
            "gpu_memory_gib": self.gpu_memory_gib,
            "fits": bool(peak <= self.gpu_memory_gib * GIB),
            "stage": w.stage, "world_size": self.world_size, "dp": self.dp, "expert_dp": self.expert_dp,
            "params_bytes": w.params, "grads_bytes": w.grads, "optimizer_bytes": w.optimizer,
        }


def plan_memory(cfg: RunConfig, world_size: int, gpu_memory_gib: float = 80.0,
                grad_reduce_in_fp32: bool = True, hf_config: dict | None = None, source: str = "") -> Plan:
    """The memory plan of `cfg` at `world_size` ranks. hf_config: the model's HF config (default:
    resolve_hf_config(cfg)). grad_reduce_in_fp32: megagsm.models.training.wrap_ddp's default."""
    from megagsm.models.provider import provider_for

    par, model, train = cfg.parallel, cfg.model, cfg.train
    if hf_config is None:
        hf_config, source = resolve_hf_config(cfg)
    provider = provider_for(hf_config)
    try:
        provider.check_layout(par)
    except UserError as e:
        raise ConfigError(str(e)) from None
    model_par = par.tp * par.pp * par.cp
    if world_size % model_par or world_size % (par.ep * par.expert_tp * par.pp):
        raise ConfigError(f"world size {world_size} is not divisible by tp*pp*cp={model_par} and "
                          f"ep*etp*pp={par.ep * par.expert_tp * par.pp}")
    dp = world_size // model_par
    expert_dp = world_size // (par.ep * par.expert_tp * par.pp)
    c = provider.settings.config
    arch = provider.architecture(par.tp)
    B = _BYTES[model.dtype]
    grad_bytes = 4 if grad_reduce_in_fp32 else B
    # fp32 main params are copies only when the model is not already fp32 (megatron's optimizers)
    opt_bytes_per_elem = 8 + (4 if B != 4 else 0)
    lora = train.lora if train.lora.enabled else None
    shape = act.Shape(hidden=c["hidden_size"], heads=c["num_attention_heads"], kv_heads=c["num_query_groups"],
                      head_dim=c["kv_channels"], ffn=c["ffn_hidden_size"], glu=2 if c.get("gated_linear_unit") else 1,
                      vocab_padded=arch.vocab_size, moe_ffn=c.get("moe_ffn_hidden_size") or 0,
                      topk=c.get("moe_router_topk") or 0,
                      shared_ffn=c.get("moe_shared_expert_intermediate_size") or 0)
    gspo = cfg.algorithm.name == "gspo"
    mbs, seq = train.micro_batch_size, cfg.data.seq_length
    if gspo:
        g = cfg.algorithm.gspo
        per_update = g.rollouts_per_step() // max(1, g.mini_batches)
        num_mb = max(1, per_update // (dp * mbs))
    else:
        num_mb = max(1, train.global_batch_size // (dp * mbs))
    gen = cfg.generation
    if gspo:
        n = cfg.algorithm.gspo.n_rollouts
        prompts_rank = -(-cfg.algorithm.gspo.prompts_per_step // dp)
        rows = min(max(1, gen.max_batch_size // n) * n, prompts_rank * n)
    else:
        rows = gen.max_batch_size
    positions = cfg.data.max_prompt_len + gen.max_new_tokens
    # generation.release_training_memory (issue 16 part 3): absent in a checkout without it (nothing is
    # released), null/auto means the GPU default (released)
    configured = getattr(gen, "release_training_memory", False)
    release = True if configured in (None, "auto") else bool(configured)
    sp = par.sequence_parallel_active
    stages = []
    for stage in range(par.pp):
        tensors = rank_parameters(c, arch.vocab_size, arch.share_embeddings_and_output_weights, par, stage, lora)
        trainable = [t for t in tensors if t.trainable]
        frozen = sum(t.numel for t in tensors if not t.trainable)
        dense = ddp_buffer([t for t in trainable if not t.expert], dp, par.use_distributed_optimizer)
        expert = ddp_buffer([t for t in trainable if t.expert], expert_dp, par.use_distributed_optimizer)
        in_buffer = dense.numel + expert.numel if par.use_distributed_optimizer else dense.numel_unpadded + expert.numel_unpadded
        sp_plan = StagePlan(stage)
        sp_plan.params = (in_buffer + frozen) * B
        sp_plan.grads = (dense.numel + expert.numel) * grad_bytes
        sp_plan.optimizer = (max(dense.shard_numel, default=0) + max(expert.shard_numel, default=0)) * opt_bytes_per_elem
        sp_plan.counts = {"total": sum(t.numel for t in tensors), "trainable": sum(t.numel for t in trainable),
                          "expert": sum(t.numel for t in trainable if t.expert)}
        layers = [i for r in layer_ranges(c["num_layers"], par.pp, par.vpp, stage) for i in r]
        per_token = sum(act.layer_bytes_per_token(shape, seq, B, par.tp, sp, par.expert_tp,
                                                  is_moe_layer(c, i), model.recompute) for i in layers)
        if model.recompute == "full" and layers:  # the layer being recomputed holds everything once
            per_token += act.layer_bytes_per_token(shape, seq, B, par.tp, sp, par.expert_tp,
                                                   is_moe_layer(c, layers[0]), "none")
        if stage == 0:
            per_token += B * shape.hidden / (par.tp if sp else 1)      # embedding output
        in_flight = act.in_flight_microbatches(par.pp, par.vpp, stage, num_mb)
        sp_plan.activations = per_token * mbs * seq / par.cp * in_flight
        if stage == par.pp - 1:
            if gspo:   # log-probs of response positions: full logits for those rows
                sp_plan.logits = act.logits_bytes(shape, mbs * min(gen.max_new_tokens, seq), B, par.tp, "plain", 0)
            else:
                sp_plan.logits = act.logits_bytes(shape, mbs * seq, B, par.tp, train.loss, train.loss_chunk_size)
        sp_plan.kv_cache = act.kv_cache_bytes(len(layers), rows, positions, shape.kv_heads, shape.head_dim, par.tp, B)
        sp_plan.generation_work = act.generation_working_bytes(shape, rows, cfg.data.max_prompt_len, B, par.tp,
                                                               bool(c.get("num_moe_experts")))
        stages.append(sp_plan)
    notes = [f"model: {source}", f"params {model.dtype if model.dtype != 'auto' else 'bf16 (auto on GPU)'}, "
             f"grads {'fp32' if grad_bytes == 4 else 'param dtype'}, optimizer "
             f"{'distributed over DP' if par.use_distributed_optimizer else 'replicated'}"]
    return Plan(stages, world_size, dp, expert_dp, source, release, gpu_memory_gib, notes)


"""The parameter tensors one rank holds, from the model's translated config (no model is built), and the
bytes megatron's DDP buffers and optimizer keep for them.

Shapes follow megatron-core 0.16.1's GPTModel with megagsm's layer specs: vocabulary padded to a
multiple of 128 * tp, column-parallel weights split along their output rows, row-parallel ones along
their input columns, norms replicated, routed experts split over EP (whole experts) and expert-TP.

Buffers (megatron's `_ParamAndGradBuffer`, one per (dense | expert) group): trainable parameters
only; with the distributed optimizer every parameter starts at a multiple of 64 elements and every
bucket ends at a multiple of lcm(DP, 128), so the buffer is padded; without it the buffer holds the
parameters back to back. With `overlap_grad_reduce=False` (megagsm's setting) each buffer is one
bucket, except that a pipeline-split tied embedding gets its own bucket.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megagsm.config.parallel import ParallelConfig
from megagsm.config.train import LoraConfig
from megagsm.config.errors import ConfigError as UserError


@dataclass(frozen=True)
class ParamTensor:
    name: str
    numel: int
    expert: bool = False             # a routed-expert weight
    shared_embedding: bool = False   # a tied embedding split over pipeline stages
    trainable: bool = True


def layer_ranges(num_layers: int, pp: int, vpp: int | None, pp_rank: int) -> list[range]:
    """Global layer numbers of each model chunk on pipeline rank pp_rank (megatron's uniform split)."""
    chunks = vpp or 1
    per_chunk = num_layers // (pp * chunks)
    return [range((c * pp + pp_rank) * per_chunk, (c * pp + pp_rank + 1) * per_chunk) for c in range(chunks)]


def is_moe_layer(config: dict, index: int) -> bool:
    if not config.get("num_moe_experts"):
        return False
    freq = config.get("moe_layer_freq", 1)
    return bool(freq[index]) if isinstance(freq, list) else index % int(freq) == 0


def _norm(name: str, size: int, config: dict) -> list[ParamTensor]:
    out = [ParamTensor(f"{name}.weight", size)]
    if config.get("normalization", "LayerNorm") == "LayerNorm":
        out.append(ParamTensor(f"{name}.bias", size))
    return out


def _lora(prefix: str, kind: str, out_local: int, in_local: int, in_full: int, rank: int) -> list[ParamTensor]:
    """megagsm.models.lora adapters: column linears keep A whole and split B; row linears split A."""
    a_in = in_full if kind == "column" else in_local
    return [ParamTensor(f"{prefix}_lora.weight_a", rank * a_in), ParamTensor(f"{prefix}_lora.weight_b", out_local * rank)]


def _linear(prefix: str, out_local: int, in_local: int, bias: int, *, expert: bool = False) -> list[ParamTensor]:
    out = [ParamTensor(f"{prefix}.weight", out_local * in_local, expert=expert)]
    if bias:
        out.append(ParamTensor(f"{prefix}.bias", bias, expert=expert))
    return out


def _layer(config: dict, index: int, parallel: ParallelConfig, lora: LoraConfig | None) -> list[ParamTensor]:
    tp, h = parallel.tp, config["hidden_size"]
    heads, groups, d = config["num_attention_heads"], config["num_query_groups"], config["kv_channels"]
    glu = 2 if config.get("gated_linear_unit") else 1
    linear_bias = bool(config.get("add_bias_linear", True))
    p = f"decoder.layers.{index}"
    qkv_out = (heads + 2 * groups) * d // tp
    qkv_bias = qkv_out if config.get("add_qkv_bias") or linear_bias else 0
    out = _norm(f"{p}.input_layernorm", h, config)
    out += _linear(f"{p}.self_attention.linear_proj", h, heads * d // tp, h if linear_bias else 0)
    out += _linear(f"{p}.self_attention.linear_qkv", qkv_out, h, qkv_bias)
    if config.get("qk_layernorm"):
        out += _norm(f"{p}.self_attention.q_layernorm", d, config)
        out += _norm(f"{p}.self_attention.k_layernorm", d, config)
    out += _norm(f"{p}.pre_mlp_layernorm", h, config)
    adapters = []
    targets = set(lora.targets) if lora is not None and lora.enabled else set()
    if "linear_proj" in targets:
        adapters += _lora(f"{p}.self_attention.linear_proj", "row", h, heads * d // tp, heads * d, lora.rank)
    if "linear_qkv" in targets:
        adapters += _lora(f"{p}.self_attention.linear_qkv", "column", qkv_out, h, h, lora.rank)
    if not is_moe_layer(config, index):
        f = config["ffn_hidden_size"]
        out += _linear(f"{p}.mlp.linear_fc1", glu * f // tp, h, glu * f // tp if linear_bias else 0)
        out += _linear(f"{p}.mlp.linear_fc2", h, f // tp, h if linear_bias else 0)
        if "linear_fc1" in targets:
            adapters += _lora(f"{p}.mlp.linear_fc1", "column", glu * f // tp, h, h, lora.rank)
        if "linear_fc2" in targets:
            adapters += _lora(f"{p}.mlp.linear_fc2", "row", h, f // tp, f, lora.rank)
    else:
        out += _moe_mlp(config, p, parallel, glu)
    if targets:  # LoRA freezes the base model: only adapters train
        out = [ParamTensor(t.name, t.numel, t.expert, t.shared_embedding, trainable=False) for t in out]
    return out + adapters


def _moe_mlp(config: dict, p: str, parallel: ParallelConfig, glu: int) -> list[ParamTensor]:
    h, experts, etp = config["hidden_size"], config["num_moe_experts"], parallel.expert_tp
    fe = config["moe_ffn_hidden_size"]
    # megatron marks expert weights allreduce=False only under expert parallelism
    expert = parallel.ep > 1
    out = [ParamTensor(f"{p}.mlp.router.weight", experts * h)]
    for e in range(experts // parallel.ep):
        q = f"{p}.mlp.experts.local_experts.{e}"
        out += _linear(f"{q}.linear_fc1", glu * fe // etp, h, 0, expert=expert)
        out += _linear(f"{q}.linear_fc2", h, fe // etp, 0, expert=expert)
    shared = config.get("moe_shared_expert_intermediate_size")
    if shared:
        out += _linear(f"{p}.mlp.shared_experts.linear_fc1", glu * shared // parallel.tp, h, 0)
        out += _linear(f"{p}.mlp.shared_experts.linear_fc2", h, shared // parallel.tp, 0)
        if config.get("moe_shared_expert_gate"):
            out.append(ParamTensor(f"{p}.mlp.shared_experts.gate_weight", h))
    return out


def rank_parameters(config: dict, vocab_padded: int, tied: bool, parallel: ParallelConfig, pp_rank: int,
                    lora: LoraConfig | None = None) -> list[ParamTensor]:
    """This rank's parameters in registration order (all model chunks). config: the provider's
    TransformerConfig kwargs (`provider.settings.config`); vocab_padded: `provider.architecture(tp)`."""
    if config.get("multi_latent_attention"):
        raise UserError("megagsm.plan: multi-latent attention (DeepSeek V2/V3) is not modelled by the planner")
    pp, vpp, h = parallel.pp, parallel.vpp, config["hidden_size"]
    frozen = lora is not None and lora.enabled
    out: list[ParamTensor] = []
    chunks = layer_ranges(config["num_layers"], pp, vpp, pp_rank)
    for c, layers in enumerate(chunks):
        first = pp_rank == 0 and c == 0
        last = pp_rank == pp - 1 and c == len(chunks) - 1
        split_tie = tied and pp > 1
        if first:
            out.append(ParamTensor("embedding.word_embeddings.weight", vocab_padded // parallel.tp * h,
                                   shared_embedding=split_tie and not last, trainable=not frozen))
        for i in layers:
            out += _layer(config, i, parallel, lora)
        if last:
            out += [ParamTensor(t.name, t.numel, trainable=not frozen)
                    for t in _norm("decoder.final_layernorm", h, config)]
            if not tied or not first:
                out.append(ParamTensor("output_layer.weight", vocab_padded // parallel.tp * h,
                                       shared_embedding=split_tie, trainable=not frozen))
    return out


# ------------------------------------------------------------------------------------ DDP buffers

def _ceil(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Buffer:
    """One megatron param/grad buffer: its element count and how many real elements each DP rank's
    shard of it holds (what the distributed optimizer keeps state for)."""

    numel: int                      # padded length of the buffer (param and grad buffers alike)
    numel_unpadded: int
    shard_numel: list[int] = field(default_factory=list)   # real elements per DP rank


def ddp_buffer(params: list[ParamTensor], dp: int, distributed: bool) -> Buffer:
    """megatron's layout of `params` (registration order) in one buffer over a DP group of size dp."""
    if not distributed:
        n = sum(p.numel for p in params)
        return Buffer(n, n, [n] * dp)
    divisor = math.lcm(dp, 128)
    ranges: list[tuple[int, int]] = []      # (start, end) of each parameter in the buffer
    buckets: list[tuple[int, int]] = []     # (start, end) of each bucket, padded
    start = bucket_start = 0
    in_bucket = 0

    def close(end: int) -> int:
        nonlocal bucket_start, in_bucket
        padded = _ceil(end, divisor)
        buckets.append((bucket_start, padded))
        bucket_start, in_bucket = padded, 0
        return padded

    for p in reversed(params):              # megatron fills buffers in reverse (backprop) order
        start = _ceil(start, 64)
        if p.shared_embedding and in_bucket:
            start = close(start)
        ranges.append((start, start + p.numel))
        start += p.numel
        in_bucket += 1
        if p.shared_embedding:
            start = close(start)
    if in_bucket:
        start = close(start)
    per_rank = [0] * dp
    for b_start, b_end in buckets:          # the distributed optimizer shards each bucket over DP
        shard = (b_end - b_start) // dp
        for r in range(dp):
            lo, hi = b_start + r * shard, b_start + (r + 1) * shard
            per_rank[r] += sum(max(0, min(e, hi) - max(s, lo)) for s, e in ranges)
    return Buffer(start, sum(p.numel for p in params), per_rank)

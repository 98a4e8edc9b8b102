"""Layout-parity harness: the same tiny GPTModel training steps under one process and under 2 ranks
with TP=2 (with and without sequence parallel), PP=2 (1F1B, 4 microbatches), EP=2 (MoE, alltoall
dispatcher) and DP=2 with the distributed optimizer; losses and updated parameters must agree.

Both runs start from the same weights (the single-process model's initial state dict, scattered with
`load_full_state_dict`), see the same global batch, and use megatron's DDP + optimizer + schedules
through `megagsm.models.training`. Two process launches in all: one for the reference, one for every
2-rank layout (parallel_state is rebuilt between layouts).

Later issues reuse it with their own model factories: `run_parity(model_factory, layouts)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megagsm.config.parallel import ParallelConfig
from megagsm.testing.multirank import run_ranks


@dataclass(frozen=True)
class TinyGPTSpec:
    """A tiny model description that can cross process boundaries (plain fields only)."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 128
    seq_length: int = 16
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_load_balancing: str = "none"     # megatron's moe_router_load_balancing_type
    moe_aux_loss_coeff: float = 0.0


@dataclass(frozen=True)
class ParityData:
    global_batch: int = 8
    micro_batch_size: int = 2  # 4 microbatches per step in one process and under PP2
    steps: int = 3
    seed: int = 1234
    lr: float = 1e-2
    # Adam divides by sqrt(v) + eps: with the usual 1e-8 a gradient entry of ~1e-8 turns a 1e-14
    # rounding difference between layouts into a visible update difference (the update is nearly
    # sign(g) * lr). A larger eps keeps the update a smooth function of the gradient, so parameter
    # differences measure gradient differences, which is what the layouts must agree on.
    adam_eps: float = 1e-4


LAYOUTS = {
    "tp2": ParallelConfig(tp=2, use_distributed_optimizer=False),
    "tp2_sp": ParallelConfig(tp=2, sequence_parallel=True, use_distributed_optimizer=False),
    "pp2": ParallelConfig(pp=2, use_distributed_optimizer=False),
    "dp2_distopt": ParallelConfig(use_distributed_optimizer=True),
    "ep2": ParallelConfig(ep=2, use_distributed_optimizer=False),
}


def tiny_gpt_model(spec: TinyGPTSpec, parallel: ParallelConfig):
    """Default model factory: a Qwen2-like GPTModel (RMSNorm, SwiGLU, RoPE, GQA), MoE when asked."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megagsm.models.gpt import GPTArchitecture, build_model_chunks
    from megagsm.models.training import parallel_fields

    moe = {}
    if spec.num_moe_experts:
        moe = dict(
            num_moe_experts=spec.num_moe_experts,
            moe_router_topk=spec.moe_router_topk,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size or spec.ffn_hidden_size // 2,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type=spec.moe_load_balancing,
            moe_aux_loss_coeff=spec.moe_aux_loss_coeff,
            moe_grouped_gemm=False,
        )
    sizes = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
    config = TransformerConfig(
        **{name: getattr(spec, name) for name in sizes},  # TinyGPTSpec uses TransformerConfig's names
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        **parallel_fields(parallel),
        **moe,
    )
    arch = GPTArchitecture(vocab_size=spec.vocab_size, max_sequence_length=spec.seq_length)
    return build_model_chunks(config, arch)


def make_global_batch(spec: TinyGPTSpec, data: ParityData, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(data.seed + step)
    tokens = torch.randint(0, spec.vocab_size, (data.global_batch, spec.seq_length + 1), generator=g)
    loss_mask = torch.ones(data.global_batch, spec.seq_length)
    loss_mask[:, : spec.seq_length // 4] = 0.0  # prompt-like positions carry no loss
    loss_mask[0, :] = 0.0                       # a fully masked sequence must not disturb the mean
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(spec.seq_length).expand(data.global_batch, -1).contiguous(),
    }


def _microbatches(batch, dp_rank, dp_size, mbs):
    per_rank = batch["tokens"].shape[0] // dp_size
    sl = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    local = {k: v[sl] for k, v in batch.items()}
    return [{k: v[i : i + mbs] for k, v in local.items()} for i in range(0, per_rank, mbs)]


def train_layouts(
    spec: TinyGPTSpec,
    data: ParityData,
    layouts: dict[str, ParallelConfig],
    init_state: dict | None,
    model_factory: Callable = tiny_gpt_model,
) -> dict:
    """Runs on every rank of one launch: for each layout, build, load init_state, train, gather."""
    from megatron.core.optimizer import OptimizerConfig

    from megagsm.models.training import build_optimizer, train_step, wrap_ddp
    from megagsm.runtime import init_runtime
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict

    results = {}
    for name, parallel in layouts.items():
        info = init_runtime(parallel, seed=data.seed)
        chunks = model_factory(spec, parallel)
        if init_state is None:
            init = gather_full_state_dict(chunks)
        else:
            load_full_state_dict(chunks, init_state)
            init = None
        chunks = wrap_ddp(chunks, parallel)
        optimizer = build_optimizer(chunks, OptimizerConfig(
            optimizer="adam", lr=data.lr, weight_decay=0.01, clip_grad=1.0, adam_eps=data.adam_eps,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
        ))
        losses, grad_norms = [], []
        for step in range(data.steps):
            mbs = _microbatches(make_global_batch(spec, data, step), info.dp_rank, info.dp_size,
                                data.micro_batch_size)
            result = train_step(chunks, optimizer, mbs, len(mbs), spec.seq_length,
                                data.micro_batch_size)
            losses.append(result.loss)
            grad_norms.append(result.grad_norm)
        final = gather_full_state_dict(chunks, dst=0)
        results[name] = {"losses": losses, "grad_norms": grad_norms, "final": final, "init": init}
    return results


def run_parity(
    spec: TinyGPTSpec,
    layouts: dict[str, ParallelConfig],
    data: ParityData = ParityData(),
    model_factory: Callable = tiny_gpt_model,
) -> tuple[dict, dict]:
    """(reference, per-layout results): the reference from one process, the layouts on 2 ranks."""
    reference = run_ranks(train_layouts, 1, spec, data, {"single": ParallelConfig()}, None,
                          model_factory)[0]["single"]
    results = run_ranks(train_layouts, 2, spec, data, layouts, reference["init"], model_factory)[0]
    return reference, results


def max_param_diff(a: dict, b: dict) -> tuple[float, str]:
    if set(a) != set(b):
        raise AssertionError(f"parameter sets differ: {sorted(set(a) ^ set(b))}")
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    return worst

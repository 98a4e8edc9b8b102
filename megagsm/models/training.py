"""Megatron training mechanics shared by the SFT and GSPO trainers (and the layout-parity harness).

Everything here is megatron-core's own machinery, wired together once: DDP with contiguous grad
buffers, the (distributed) optimizer, `get_forward_backward_func` schedules (no pipelining, 1F1B,
interleaved) and `finalize_model_grads`. Losses are summed per token and divided by the global token
count once (`calculate_per_token_loss`), so the loss and the gradients are identical under any
TP/PP/EP/DP layout and any split into microbatches.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megagsm.config.parallel import ParallelConfig
from megagsm.runtime.collectives import broadcast_from_last_stage, dp_group, dp_rank_and_size, reduce_tensor
from megagsm.runtime.distributed import megatron_parallel_sizes


def parallel_fields(parallel: ParallelConfig) -> dict:
    """TransformerConfig fields that must agree with the process groups."""
    # megatron rejects sequence parallelism without tensor parallelism
    return dict(megatron_parallel_sizes(parallel), sequence_parallel=parallel.sequence_parallel_active)


def sequence_length_multiple(parallel: ParallelConfig) -> int:
    """Sequence lengths must divide by tp under sequence parallelism and by 2*cp under context
    parallelism; 8 keeps matmul shapes friendly."""
    multiple = 8
    if parallel.sequence_parallel_active:
        multiple = math.lcm(multiple, parallel.tp)
    if parallel.cp > 1:
        multiple = math.lcm(multiple, 2 * parallel.cp)
    return multiple


def wrap_ddp(model_chunks: list, parallel: ParallelConfig, grad_reduce_in_fp32: bool = True) -> list:
    for chunk in model_chunks:
        # must be set before DDP is built: DDP then sums grads over DP instead of averaging them,
        # and finalize_model_grads divides once by the global token count
        chunk.config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    # without overlap each gradient buffer is one bucket already (megatron sets bucket_size to None):
    # megatron's disable_bucketing for chunks after the first would only regroup the same all-reduces
    return [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk)
            for chunk in model_chunks]


def use_fused_torch_adam_on_cpu(optimizer) -> int:
    """Switch the torch Adam/AdamW inside a megatron optimizer to torch's fused kernel when all its
    parameters live on the CPU; returns how many torch optimizers were switched.

    Without transformer-engine/apex megatron falls back to torch.optim.AdamW, built without `fused`
    or `foreach`, which on CPU runs torch's per-tensor loop (about ten ops per parameter tensor).
    The fused CPU kernel applies the same update in one pass per tensor: 52 ms -> 10 ms per step for
    a 20M-parameter model on one core (bench/sft.py). megatron constructs the torch optimizer itself
    and does not expose the flag, hence the switch on its param groups (read at every step)."""
    switched = 0
    for megatron_opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(megatron_opt, "optimizer", None)
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for group in torch_opt.param_groups for p in group["params"]]
        if not params or any(p.device.type != "cpu" or not p.is_floating_point() for p in params):
            continue
        for group in torch_opt.param_groups:
            group["fused"], group["foreach"] = True, False
        switched += 1
    return switched


def build_optimizer(model_chunks: list, optimizer_config: OptimizerConfig):
    """megatron's optimizer over the DDP-wrapped chunks; wires the loss/grad hooks into their config."""
    optimizer = get_megatron_optimizer(optimizer_config, model_chunks)
    use_fused_torch_adam_on_cpu(optimizer)
    no_sync = [c.no_sync for c in model_chunks]
    for chunk in model_chunks:
        config = chunk.config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return optimizer


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Loss function for megatron's schedules: (sum of masked token losses, token count, report)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm_loss": report}


def thd_kwargs(batch: dict) -> dict:
    """The model's packed_seq_params keyword for a THD microbatch (megagsm.models.packed_seq), else none."""
    return {"packed_seq_params": batch["packed_seq_params"]} if "packed_seq_params" in batch else {}


def lm_forward_step(data_iterator, model):
    """Standard next-token forward: batch dict with tokens/position_ids/labels/loss_mask (and
    packed_seq_params for a THD microbatch)."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
        **thd_kwargs(batch),
    )
    return output, partial(masked_token_loss, batch["loss_mask"])


@dataclass
class StepResult:
    loss: float            # token-mean loss over the global batch (same on every rank)
    num_tokens: int
    grad_norm: float | None
    update_successful: bool
    reports: list[dict] = field(default_factory=list)  # the loss functions' per-microbatch reports (last stage)


def _global_loss(reports: list[dict], key: str = "lm_loss") -> tuple[float, int]:
    """Sum the per-microbatch reports on the last PP stage, over DP, then share with every rank
    (only the last stage holds the loss). The sums stay on the reports' device."""
    total = torch.zeros(2, dtype=torch.float64, device=reports[0][key].device if reports else None)
    for report in reports:
        total += report[key].double()
    total = broadcast_from_last_stage(reduce_tensor(total, "sum", dp_group(with_context_parallel=True)))
    loss, count = total.tolist()
    return loss / max(count, 1.0), int(count)


def run_schedule(model_chunks, microbatches: Iterable, num_microbatches: int, seq_length: int,
                 micro_batch_size: int, forward_step_func: Callable, forward_only: bool,
                 collect_non_loss_data: bool = False) -> list:
    """megatron's schedule for this layout over the given microbatches (every virtual stage reads the
    same list); returns what the last pipeline stage collected (loss reports, or the forward
    outputs with collect_non_loss_data)."""
    microbatches = list(microbatches)
    iterators = [iter(microbatches) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks, num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only, collect_non_loss_data=collect_non_loss_data)


def has_moe(model_chunks: list) -> bool:
    return bool(getattr(model_chunks[0].config, "num_moe_experts", None))


@contextlib.contextmanager
def moe_aux_loss_scale(model_chunks: list, global_count: float | None, num_microbatches: int):
    """MoE auxiliary losses (load balancing, z-loss) weighted as in Megatron-LM's mean-loss training,
    whatever the loss is divided by. With per-token losses megatron scales each microbatch's aux-loss
    gradient by 1 and then divides every gradient by the global count C (tokens for token-mean, sequences
    for seq-mean): the coefficient would mean coeff / C, a different thing under each aggregation. Scaling
    the aux loss by C / (microbatches * dp) gives back coeff x the mean over all microbatches, as with
    `calculate_per_token_loss=False`. global_count None (or a dense model): megatron's own scale."""
    if global_count is None or not has_moe(model_chunks):
        yield
        return
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    _, dp = dp_rank_and_size()
    factor = float(global_count) / (num_microbatches * dp)
    megatron_scale = MoEAuxLossAutoScaler.set_loss_scale
    MoEAuxLossAutoScaler.set_loss_scale = staticmethod(lambda scale: megatron_scale(scale * factor))
    try:
        yield
    finally:
        MoEAuxLossAutoScaler.set_loss_scale = staticmethod(megatron_scale)


def train_step(
    model_chunks: list,
    optimizer,
    microbatches: Iterable[dict],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step_func: Callable = lm_forward_step,
    global_count: float | None = None,
) -> StepResult:
    """One optimizer step over the microbatches. global_count: the global sum of the loss functions'
    counts for this step (tokens or sequences), which MoE aux losses need (see moe_aux_loss_scale)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    with moe_aux_loss_scale(model_chunks, global_count, num_microbatches):
        reports = run_schedule(model_chunks, microbatches, num_microbatches, seq_length,
                               micro_batch_size, forward_step_func, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    loss, num_tokens = _global_loss(reports)
    return StepResult(loss, num_tokens, None if grad_norm is None else float(grad_norm),
                      bool(update_successful), reports)


@torch.no_grad()
def eval_step(model_chunks, microbatches, num_microbatches, seq_length, micro_batch_size,
              forward_step_func: Callable = lm_forward_step) -> tuple[float, int]:
    """Forward-only loss over the given microbatches: (token-mean loss, token count)."""
    reports = run_schedule(model_chunks, microbatches, num_microbatches, seq_length,
                           micro_batch_size, forward_step_func, forward_only=True)
    return _global_loss(reports)

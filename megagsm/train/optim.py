"""The run config's `optim` section -> megatron's OptimizerConfig and OptimizerParamScheduler."""
from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, get_canonical_lr_for_logging

from megagsm.config.optim import OptimConfig
from megagsm.config.parallel import ParallelConfig


# OptimConfig fields that OptimizerConfig spells the same way
_SAME_NAMES = ("optimizer", "lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad")


def optimizer_config(optim: OptimConfig, parallel: ParallelConfig, dtype: torch.dtype) -> OptimizerConfig:
    """bf16/fp16 models train with fp32 main params inside megatron's optimizer; fp16 adds dynamic
    loss scaling. lr and min_lr also go to the param groups, where the scheduler reads them."""
    return OptimizerConfig(
        **{name: getattr(optim, name) for name in _SAME_NAMES},
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )


def build_scheduler(optim: OptimConfig, optimizer, train_steps: int) -> OptimizerParamScheduler:
    """Linear warmup from 0 over optim.warmup_steps, then optim.lr_decay_style down to optim.min_lr
    over lr_decay_steps (default: train.train_steps). Stepped once per optimizer step.

    As in Megatron-LM, step i (counting from 0) uses the lr at num_steps=i, so with warmup the very
    first update has lr 0."""
    decay_steps = optim.lr_decay_steps or train_steps
    # megatron requires warmup < decay; a run shorter than its warmup simply never decays
    decay_steps = max(decay_steps, optim.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(1, train_steps),
        wd_incr_style="constant",
        # a resumed run continues the saved schedule (the config must agree; megatron checks it)
        use_checkpoint_opt_param_scheduler=True,
    )


def current_lr(optimizer) -> float:
    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return float(optimizer.param_groups[0]["lr"] if lr is None else lr)

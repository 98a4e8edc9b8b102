"""Optimizer and learning-rate schedule. Names follow megatron-core's OptimizerConfig where they overlap."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class OptimConfig:
    optimizer: Literal["adam", "sgd"] = "adam"   # adam is AdamW (decoupled weight decay) in megatron
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0             # global grad-norm clip; 0 disables
    warmup_steps: int = 0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "constant"
    lr_decay_steps: int | None = None  # None: train.train_steps

"""Which process am I? Read without requiring torch.distributed to be initialised."""
from __future__ import annotations

import os

import torch.distributed as dist


def get_rank() -> int:
    """torch.distributed's rank when a process group exists, else env RANK (launchers set it), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return get_rank() == 0

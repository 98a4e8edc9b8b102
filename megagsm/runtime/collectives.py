"""Every collective of the project outside megatron's own: the device a group's backend can serve,
megatron's TP/DP/PP groups, and reductions of Python numbers and small tensors.

On a GPU the default group is made with "cpu:gloo,cuda:nccl" (runtime.distributed), but megatron's
subgroups are NCCL-only: a tensor reduced over them must be on the GPU, and NCCL rejects CPU tensors
("No backend type associated with device type cpu"). `backend_device(group)` says where a tensor
must live for `group`; the reductions here move their operands there and hand results back as
Python values, so no caller picks a device by hand. Without a process group every function is the
identity of one rank.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _megatron_ready() -> bool:
    from megatron.core import parallel_state as ps

    return initialized() and ps.model_parallel_is_initialized()


def backend_name(group=None) -> str:
    """The backend string of `group` ("gloo", "nccl", "cpu:gloo,cuda:nccl"); tests emulating NCCL on
    CPU replace this one function (megagsm.testing.collective_check)."""
    return str(dist.get_backend(group))


def backend_device(group=None) -> torch.device:
    """Where a collective over `group` needs its tensors: the current GPU when the group's backend
    includes NCCL, else the CPU (gloo)."""
    if initialized() and "nccl" in backend_name(group) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_backend_device(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """A copy of `tensor` (detached) on the device `group`'s backend serves: the one operand every
    tensor collective here runs on."""
    return tensor.detach().to(backend_device(group), copy=True)


def group_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def group_rank(group=None) -> int:
    """This process's rank inside `group` (0 without a process group)."""
    return dist.get_rank(group) if initialized() else 0


# ---------------------------------------------------------------- megatron's groups

def tp_group():
    """The tensor-parallel group, or None when there is no tensor parallelism."""
    from megatron.core import parallel_state as ps

    if _megatron_ready() and ps.get_tensor_model_parallel_world_size() > 1:
        return ps.get_tensor_model_parallel_group()
    return None


def tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() if tp_group() is not None else 0


def dp_group(with_context_parallel: bool = False):
    """The data-parallel group (None before megatron's groups exist)."""
    from megatron.core import parallel_state as ps

    if _megatron_ready():
        return ps.get_data_parallel_group(with_context_parallel=with_context_parallel)
    return None


def dp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if _megatron_ready():
        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    return 0, 1


def pp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() if _megatron_ready() else 1


# ---------------------------------------------------------------- reductions

def reduce_tensor(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """A reduced copy of `tensor` over `group` (the default group when None), on the tensor's own
    device; the collective itself runs where the group's backend needs it."""
    if not initialized() or group_size(group) == 1:
        return tensor.clone()
    work = on_backend_device(tensor, group)
    dist.all_reduce(work, op=_OPS[op], group=group)
    return work.to(tensor.device)


def reduce_numbers(values: Sequence[float], op: str = "sum", group=None) -> list[float]:
    """Python numbers reduced over `group` (float64), as Python floats."""
    if not values:
        return []
    return reduce_tensor(torch.tensor([float(v) for v in values], dtype=torch.float64), op, group).tolist()


def all_ranks_true(flag: bool, group=None) -> bool:
    """True only when `flag` is true on every rank: keeps every rank on the same branch of a collective."""
    return reduce_numbers([1.0 if flag else 0.0], "min", group)[0] > 0


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's `tensor` on every stage (same shape and dtype everywhere)."""
    from megatron.core import parallel_state as ps

    if pp_size() == 1:
        return tensor
    group = ps.get_pipeline_model_parallel_group()
    work = on_backend_device(tensor, group)
    dist.broadcast(work, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
    return work.to(tensor.device)


def gather_objects(obj: Any, group=None) -> list:
    """Every rank's `obj` (picklable, written by this program), in rank order. torch serialises
    objects onto the device the group's backend serves by itself."""
    if not initialized() or group_size(group) == 1:
        return [obj]
    out: list = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not initialized() or group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)

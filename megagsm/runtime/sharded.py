"""Layout-free views of a megatron model's weights, built from its own `sharded_state_dict()`.

megatron describes every local shard with its global key, global shape and offset (layers stacked on a
leading axis, fused GLU weights split into [gate; up] halves by its factories). That is exactly the
layout-free form its torch_dist checkpoints use, so gathering or scattering through it gives tensors
that are identical whatever the TP/PP/EP layout. Meant for tiny models (tests, parity checks): it
moves every shard through `all_gather_object`. Big models go through dist_checkpointing instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

from megagsm.runtime.collectives import gather_objects


def _local_shards(model_chunks) -> list[ShardedTensor]:
    shards = []
    for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
        chunk = getattr(chunk, "module", chunk)  # unwrap DDP
        sharded = chunk.sharded_state_dict()
        apply_factories(sharded)
        for value in nested_values(sharded):
            if isinstance(value, ShardedTensor) and value.data is not None:
                if value.flattened_range is not None:
                    raise ValueError(f"{value.key}: flattened shards are not supported here")
                shards.append(value)
    return shards


def _global_slice(shard: ShardedTensor) -> tuple:
    pre = shard.prepend_axis_num
    offsets = shard.global_offset
    index = [slice(o, o + 1) for o in offsets[:pre]]
    index += [slice(o, o + s) for o, s in zip(offsets[pre:], shard.data.shape)]
    return tuple(index)


def gather_full_state_dict(model_chunks, dst: int | None = None, keys: Callable[[str], bool] | None = None,
                           keep_dtype: bool = False) -> dict[str, torch.Tensor] | None:
    """Every global tensor, assembled from all ranks. Returned on every rank (dst=None) or on dst only.
    `keys`: only the tensors whose key it accepts, sent by their main replicas alone (data-parallel
    copies stay home). fp32 unless `keep_dtype`."""
    local = [
        (s.key, tuple(s.global_shape), _global_slice(s),
         s.data.detach().cpu().clone() if keep_dtype else s.data.detach().float().cpu().clone())
        for s in _local_shards(model_chunks)
        if keys is None or (keys(s.key) and is_main_replica(s.replica_id))
    ]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = gather_objects(local)
        if dst is not None and dist.get_rank() != dst:
            return None
        entries = [e for rank_entries in everyone for e in rank_entries]
    else:
        entries = local
    full: dict[str, torch.Tensor] = {}
    for key, shape, index, data in entries:
        target = full.setdefault(key, torch.full(shape, float("nan"), dtype=data.dtype))
        target[index] = data.reshape(target[index].shape)
    missing = [k for k, t in full.items() if torch.isnan(t).any()]
    if missing:
        raise RuntimeError(f"gathered tensors have holes (no rank owns part of them): {missing}")
    return full


@torch.no_grad()
def load_full_state_dict(model_chunks, full: dict[str, torch.Tensor]) -> None:
    """Copies each rank's slices of `full` (as produced by gather_full_state_dict) into its params."""
    for shard in _local_shards(model_chunks):
        if shard.key not in full:
            raise KeyError(f"{shard.key} missing from the given state dict")
        source = full[shard.key]
        if tuple(source.shape) != tuple(shard.global_shape):
            raise ValueError(
                f"{shard.key}: shape {tuple(source.shape)} != model's {tuple(shard.global_shape)}"
            )
        shard.data.copy_(source[_global_slice(shard)].reshape(shard.data.shape))

"""HF safetensors -> megatron torch_dist checkpoint, streaming.

Each rank builds its pipeline stage of the model on the meta device (no memory) to learn from
megatron itself which global tensor regions it owns (`sharded_state_dict()`: keys, global shapes,
offsets, replica ids; TP slices, PP layers, EP experts all resolved by megatron). Every region it owns
as the main replica becomes one chunk of the DCP save, produced on demand by reading just those rows
(and columns) of the HF tensors behind it. Before anything is written, every rank checks the whole
model: each megatron tensor has a mapping, each HF tensor is used, shapes match the config.
"""
from __future__ import annotations

import re
import time
import warnings
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

from megagsm.checkpoint.dcp_io import Chunk, save_lazy
from megagsm.checkpoint.finite import check_finite
from megagsm.checkpoint.integrity import content_manifest
from megagsm.checkpoint.safetensors_io import SafetensorsDir
from megagsm.config.parallel import ParallelConfig
from megagsm.models.errors import ModelInputError
from megagsm.models.mapping import Dims, WeightRule, pieces
from megagsm.checkpoint.manifest import copy_hf_side_files, write_manifest
from megagsm.models.hf_config import HF_SUBDIR
from megagsm.models.provider import ModelProvider, load_hf_config, provider_for
from megagsm.runtime.collectives import broadcast_object, gather_objects
from megagsm.utils.atomic import atomic_dir


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _all_gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    return gather_objects(obj)


def model_shards(model_chunks) -> list[ShardedTensor]:
    """Every ShardedTensor of this rank's chunks (main replicas or not), GLU factories applied."""
    shards = []
    for chunk in model_chunks:
        sharded = chunk.sharded_state_dict()
        apply_factories(sharded)
        shards += [v for v in nested_values(sharded) if isinstance(v, ShardedTensor)]
    return shards


def _fused_shape(provider: ModelProvider, rule: WeightRule, shard: ShardedTensor) -> tuple:
    """The per-index global shape as stored: vocab tensors at the HF vocab size, not megatron's pad."""
    shape = tuple(shard.global_shape[shard.prepend_axis_num:])
    return (provider.vocab_size, *shape[1:]) if rule.vocab else shape


def check_hf_tensors(provider: ModelProvider, files: SafetensorsDir, used: dict) -> None:
    """used: {(mcore key, index): fused shape} for the whole model. Raises ModelInputError for
    missing, misshapen, mixed-dtype or leftover HF tensors."""
    rules, dims = provider.weight_map.by_mcore(), provider.dims()
    names_used = set()
    for (key, index), fused in sorted(used.items()):
        rule = rules[key]
        names = rule.hf_names(index)
        expected = rule.kind.hf_shapes(fused, dims)
        for name, shape in zip(names, expected):
            info = files.info(name)
            if info.shape != tuple(shape):
                raise ModelInputError(
                    f"{info.file}: tensor {name} has shape {list(info.shape)} but the config implies "
                    f"{list(shape)} (for megatron {key})"
                )
        dtypes = {files.info(n).dtype for n in names}
        if len(dtypes) > 1:
            raise ModelInputError(f"{files.dir}: tensors {names} have mixed dtypes {sorted(map(str, dtypes))}")
        names_used.update(names)
    ignored = [re.compile(p) for p in provider.weight_map.ignored_hf]
    for pattern, why in provider.weight_map.skipped_hf.items():
        skipped = sorted(n for n in files.names() if re.fullmatch(pattern, n))
        if skipped:
            if _rank() == 0:
                warnings.warn(f"{files.dir}: {len(skipped)} tensor(s) like {skipped[0]} are not converted: {why}")
            ignored.append(re.compile(pattern))
    tied = provider.weight_map.tied_hf
    leftover = sorted(
        n for n in files.names() - names_used
        if n not in tied and not any(p.fullmatch(n) for p in ignored)
    )
    if leftover:
        raise ModelInputError(
            f"{files.info(leftover[0]).file}: tensor {leftover[0]} has no megatron mapping for "
            f"model_type {provider.model_type!r} ({len(leftover)} unmapped tensor(s))"
        )


def _check_tied(provider: ModelProvider, files: SafetensorsDir) -> None:
    """A tied model may still carry lm_head.weight: accept it only if it equals the embedding."""
    problem = None
    if _rank() == 0:
        for extra, canonical in provider.weight_map.tied_hf.items():
            if extra in files.names() and not torch.equal(files.read(extra), files.read(canonical)):
                problem = (f"{files.info(extra).file}: tensor {extra} differs from {canonical} although "
                           "tie_word_embeddings is true")
    problem = _broadcast(problem)
    if problem:
        raise ModelInputError(problem)


def _broadcast(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    return broadcast_object(obj, src=0)


def read_region(files: SafetensorsDir, rule: WeightRule, names: list[str], dims: Dims,
                offset: tuple, shape: tuple, allow_nonfinite: bool = True) -> torch.Tensor:
    """Rows/columns [offset, offset + shape) of the fused megatron tensor, from the HF tensors;
    NaN/Inf is an error naming the HF tensors unless allow_nonfinite."""
    region = _read_region(files, rule, names, dims, offset, shape)
    if not allow_nonfinite:
        check_finite(region, "/".join(names), files.info(names[0]).file)
    return region


def _read_region(files: SafetensorsDir, rule: WeightRule, names: list[str], dims: Dims,
                 offset: tuple, shape: tuple) -> torch.Tensor:
    infos = [files.info(n) for n in names]
    segments = rule.kind.segments([i.shape for i in infos], dims)
    cols = None
    if len(shape) > 1:
        full_cols = infos[0].shape[1]
        if offset[1] != 0 or shape[1] != full_cols:
            cols = (offset[1], offset[1] + shape[1])
        if len(shape) > 2 and tuple(shape[2:]) != tuple(infos[0].shape[2:]):
            raise NotImplementedError(f"{rule.mcore}: sharding past dim 1 is not supported")
    parts = list(pieces(segments, offset[0], offset[0] + shape[0]))
    if len(parts) == 1:
        src, a, b, _ = parts[0]
        whole = (a, b) == (0, infos[src].shape[0]) and cols is None
        return files.read(names[src], None if whole else (a, b), cols)
    out = torch.empty(shape, dtype=infos[0].dtype)
    for src, a, b, dst in parts:
        out[dst:dst + b - a] = files.read(names[src], (a, b), cols)
    return out


def plan_chunks(provider: ModelProvider, files: SafetensorsDir, shards: list[ShardedTensor],
                allow_nonfinite: bool = False) -> list[Chunk]:
    """Validates the whole model (collective) and returns the chunks this rank writes."""
    rules, dims = provider.weight_map.by_mcore(), provider.dims()
    unmapped = sorted({s.key for s in shards if s.key not in rules})
    used, mine = {}, []
    for shard in shards:
        rule = rules.get(shard.key)
        if rule is None:
            continue
        if len(rule.axes) != shard.prepend_axis_num:
            raise RuntimeError(f"{shard.key}: rule axes {rule.axes} but megatron prepends "
                               f"{shard.prepend_axis_num} axes")
        index = tuple(shard.global_offset[:shard.prepend_axis_num])
        used[(shard.key, index)] = _fused_shape(provider, rule, shard)
        if is_main_replica(shard.replica_id):
            mine.append((rule, index, shard))
    everyone = _all_gather((unmapped, used))
    unmapped = sorted({k for u, _ in everyone for k in u})
    if unmapped:
        raise ModelInputError(
            f"megatron tensor {unmapped[0]} has no HF mapping for model_type {provider.model_type!r}"
        )
    used = {k: v for _, u in everyone for k, v in u.items()}
    check_hf_tensors(provider, files, used)
    _check_tied(provider, files)

    chunks = []
    for rule, index, shard in mine:
        pre = shard.prepend_axis_num
        fused = used[(shard.key, index)]
        offset, shape = tuple(shard.global_offset[pre:]), tuple(shard.local_shape)
        if rule.vocab:  # megatron's padding rows are not stored
            rows = min(offset[0] + shape[0], fused[0]) - offset[0]
            if rows <= 0:
                continue
            shape = (rows, *shape[1:])
        names = rule.hf_names(index)
        chunks.append(Chunk(
            key=shard.key,
            global_shape=(*shard.global_shape[:pre], *fused),
            offsets=(*index, *offset),
            sizes=((1,) * pre + shape),
            dtype=files.info(names[0]).dtype,
            produce=partial(read_region, files, rule, names, dims, offset, shape, allow_nonfinite),
        ))
    return chunks


def convert_hf_to_mcore(hf_dir, out_dir, parallel: ParallelConfig, overwrite: bool = False,
                        progress: bool = True, allow_nonfinite: bool = False) -> dict:
    """Collective: run on every rank after init_runtime(parallel). Returns a summary dict. A NaN/Inf
    weight is an error (nothing written) unless allow_nonfinite."""
    start = time.perf_counter()
    hf_config = load_hf_config(hf_dir)
    provider = provider_for(hf_config)
    provider.check_layout(parallel)
    files = SafetensorsDir(hf_dir)
    shards = model_shards(provider.build(parallel, meta=True))
    chunks = plan_chunks(provider, files, shards, allow_nonfinite)

    bar = None
    if progress and _rank() == 0:
        from tqdm import tqdm

        bar = tqdm(total=sum(c.nbytes for c in chunks), unit="B", unit_scale=True,
                   desc="hf-to-mcore (rank 0)")
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            save_lazy(chunks, tmp, on_chunk=(lambda c: bar.update(c.nbytes)) if bar else None)
            if _rank() == 0:
                copy_hf_side_files(files.dir, tmp / HF_SUBDIR)
                write_manifest(tmp, writer="hf-to-mcore", model_type=provider.model_type,
                               vocab_size=provider.vocab_size,
                               written_with={"tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep},
                               **content_manifest(tmp))
    finally:
        if bar is not None:
            bar.close()
    written = sum(_all_gather(sum(c.nbytes for c in chunks)))
    return {"model_type": provider.model_type, "bytes": written,
            "chunks": sum(_all_gather(len(chunks))), "seconds": round(time.perf_counter() - start, 3)}

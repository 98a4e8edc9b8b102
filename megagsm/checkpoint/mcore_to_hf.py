"""megatron torch_dist checkpoint -> HF safetensors, in one process, whatever layout wrote it.

The checkpoint's metadata gives every tensor's global shape and stored chunks, so the HF names,
shapes and dtypes are all known before any data is read: the safetensors shards are planned first
and then filled a tensor at a time (one fused megatron tensor for one layer in memory at once).
Vocabulary tensors are cut to the HF vocab_size (megatron's padding rows are dropped).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megagsm.checkpoint.dcp_io import DcpReader
from megagsm.checkpoint.finite import check_finite
from megagsm.checkpoint.integrity import verify_checkpoint
from megagsm.checkpoint.safetensors_io import ShardedSafetensorsWriter
from megagsm.models.errors import ModelInputError
from megagsm.models.mapping import WeightRule, split
from megagsm.checkpoint.manifest import copy_hf_side_files
from megagsm.models.hf_config import HF_SUBDIR
from megagsm.models.provider import ModelProvider, hf_files_dir, load_hf_config, provider_for
from megagsm.utils.atomic import atomic_dir

# checkpoint keys that are not model weights (a trainer's checkpoint may hold them too)
NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "rerun_state", "args", "opt_param_scheduler")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Job:
    rule: WeightRule
    index: tuple
    fused_shape: tuple
    names: list
    shapes: list
    dtype: torch.dtype


def _indices(rule: WeightRule, md, reader: DcpReader, complete: bool) -> list[tuple]:
    """The index tuples (layer, expert, ...) a stacked key has data for. complete: every index of
    the global shape must be there (dense models); MoE models may hold a key for some layers only
    (e.g. dense MLPs in DeepSeek's first layers), each present index is then read whole."""
    n = len(rule.axes)
    if n == 0:
        return [()]
    have = sorted({tuple(c.offsets[:n]) for c in md.chunks})
    if complete:
        lost = [i for i in _product(md.size[:n]) if i not in set(have)]
        if lost:
            raise ModelInputError(f"{reader.dir}: tensor {rule.mcore} has no data for "
                                  f"{dict(zip(rule.axes, lost[0]))}")
    return have


def _product(sizes) -> list[tuple]:
    out = [()]
    for s in sizes:
        out = [t + (i,) for t in out for i in range(s)]
    return out


def plan_export(provider: ModelProvider, reader: DcpReader, dtype: torch.dtype | None) -> list[_Job]:
    stored = reader.tensors()
    rules = provider.weight_map.rules
    dims = provider.dims()
    model_keys = {k for k in stored if not k.startswith(NON_MODEL_PREFIXES)}
    unmapped = sorted(model_keys - {r.mcore for r in rules})
    if unmapped:
        raise ModelInputError(f"{reader.dir}: megatron tensor {unmapped[0]} has no HF mapping for "
                              f"model_type {provider.model_type!r}")
    first_stacked = min((i for i, r in enumerate(rules) if r.axes), default=len(rules))
    jobs = []
    for pos, rule in enumerate(rules):
        md = stored.get(rule.mcore)
        if md is None:
            raise ModelInputError(f"{reader.dir}: tensor {rule.mcore} missing from the checkpoint")
        fused = tuple(md.size[len(rule.axes):])
        if rule.vocab:
            if fused[0] < provider.vocab_size:
                raise ModelInputError(f"{reader.dir}: {rule.mcore} has {fused[0]} rows but config.json "
                                      f"vocab_size is {provider.vocab_size}")
            fused = (provider.vocab_size, *fused[1:])
        if rule.axes and rule.axes[0] == "layer" and md.size[0] != provider.num_layers:
            raise ModelInputError(f"{reader.dir}: {rule.mcore} holds {md.size[0]} layers but config.json "
                                  f"num_hidden_layers is {provider.num_layers}")
        try:
            shapes = rule.kind.hf_shapes(fused, dims)
        except ModelInputError as e:
            raise ModelInputError(f"{reader.dir}: {rule.mcore} {list(fused)}: {e}") from None
        for index in _indices(rule, md, reader, complete=not provider.family.is_moe):
            order = index if index else ((-1,) if pos < first_stacked else (math.inf,))
            jobs.append((order, pos, _Job(rule, index, fused, rule.hf_names(index), shapes,
                                          (rule.cast and dtype) or md.properties.dtype)))
    return [j for _, _, j in sorted(jobs, key=lambda t: (t[0], t[1]))]


def _hf_tensors(reader: DcpReader, job: _Job, dims):
    """(name, tensor) of one job. HF tensors that are one row range of the fused tensor (copies,
    gate/up halves) are read as that range alone, often one stored chunk (memory-mapped, no copy);
    interleaved ones (q/k/v) are split out of the whole fused tensor."""
    n_axes = len(job.rule.axes)
    segments = job.rule.kind.segments(job.shapes, dims)
    if all(s.source == i and s.start == 0 for i, s in enumerate(segments)) and len(segments) == len(job.names):
        row = 0
        for seg, name, shape in zip(segments, job.names, job.shapes):
            region = (*([1] * n_axes), seg.rows, *job.fused_shape[1:])
            data = reader.read(job.rule.mcore, (*job.index, row, *([0] * (len(job.fused_shape) - 1))), region,
                               job.dtype)
            row += seg.rows
            yield name, data.reshape(shape)
        return
    fused = reader.read(job.rule.mcore, (*job.index, *([0] * len(job.fused_shape))),
                        (*([1] * n_axes), *job.fused_shape), job.dtype).reshape(job.fused_shape)
    yield from zip(job.names, split(job.rule, fused, dims))


def side_files_dir(mcore_dir, hf_config_dir=None) -> Path:
    """Where config.json and the tokenizer come from: --hf-config-dir, else MCORE_DIR/hf/ (a
    checkpoint without it, e.g. one saved by plain megatron, needs --hf-config-dir)."""
    mcore_dir = Path(mcore_dir)
    if hf_config_dir is not None:
        return hf_files_dir(hf_config_dir)
    if not (mcore_dir / HF_SUBDIR / "config.json").is_file() and not (mcore_dir / "config.json").is_file():
        raise ModelInputError(f"{mcore_dir}: no {HF_SUBDIR}/config.json (the HF config and tokenizer a megagsm "
                              "checkpoint carries); pass --hf-config-dir DIR with the model's config.json")
    return hf_files_dir(mcore_dir)


def convert_mcore_to_hf(mcore_dir, out_dir, hf_config_dir=None, max_shard_bytes: int = 5 * 2**30,
                        dtype: str | None = None, overwrite: bool = False, progress: bool = True,
                        allow_nonfinite: bool = False) -> dict:
    """Exports a torch_dist model checkpoint to an HF model directory. One process. The checkpoint is
    verified first (manifest sizes and checksums, every shard present); a NaN/Inf weight is an error
    (nothing written) unless allow_nonfinite."""
    start = time.perf_counter()
    mcore_dir = Path(mcore_dir)
    if not mcore_dir.is_dir():
        raise ModelInputError(f"{mcore_dir}: no such directory")
    side = side_files_dir(mcore_dir, hf_config_dir)
    hf_config = load_hf_config(side)
    provider = provider_for(hf_config)
    if dtype is not None and dtype not in DTYPES:
        raise ModelInputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    verify_checkpoint(mcore_dir)
    reader = DcpReader(mcore_dir)
    jobs = plan_export(provider, reader, DTYPES.get(dtype))
    dims = provider.dims()
    entries = [(n, tuple(s), j.dtype) for j in jobs for n, s in zip(j.names, j.shapes)]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(math.prod(s) * d.itemsize for _, s, d in entries), unit="B",
                   unit_scale=True, desc="mcore-to-hf")
    writer = None
    try:
        with atomic_dir(out_dir, overwrite=overwrite, collective=False) as tmp:
            writer = ShardedSafetensorsWriter(tmp, entries, max_shard_bytes)
            for job in jobs:
                for name, tensor in _hf_tensors(reader, job, dims):
                    if not allow_nonfinite:
                        check_finite(tensor, name, f"{mcore_dir} ({job.rule.mcore})")
                    writer.write(name, tensor)
                    if bar is not None:
                        bar.update(tensor.numel() * tensor.element_size())
                    del tensor
            files = writer.finish()
            copied = copy_hf_side_files(side, tmp)
            if dtype is not None:
                _set_config_dtype(tmp / "config.json", dtype)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    return {"model_type": provider.model_type, "tensors": len(entries), "files": files,
            "side_files": copied, "bytes": writer.total_bytes,
            "seconds": round(time.perf_counter() - start, 3)}


def _set_config_dtype(path: Path, dtype: str) -> None:
    cfg = json.loads(path.read_text())
    for field in ("dtype", "torch_dtype"):
        if field in cfg:
            cfg[field] = dtype
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

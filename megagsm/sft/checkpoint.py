"""Training checkpoints: megatron dist_checkpointing (torch_dist) of the model, the optimizer, the LR
scheduler, the data position and every RNG state, written atomically.

Layout of `save_dir`:

    iter_0000100/          a complete checkpoint (dist_checkpointing files + trainer_state.json)
    iter_0000200.tmp/      a save in progress or killed mid-way: never read, removed by the next save
    latest                 "iter_0000200": written (atomically) after the rename

A checkpoint directory gets its final name only by `os.replace` from `.tmp` once every rank has
finished writing, so a complete-looking name is a complete checkpoint. `latest` is a hint: if a run
dies between the rename and the `latest` update, `find_latest` still picks the newest complete dir.

Model and optimizer tensors are layout-free (megatron's sharded state dicts), so a checkpoint loads
under another TP/PP/DP layout; RNG states are per rank and restored only under the same world size.
`common.pt` (megatron's non-tensor part) is read with torch.load's weights_only default, so everything
in it is kept to plain python values and tensors.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megagsm.utils.atomic import write_text_atomic
from megagsm.utils.logging import get_logger

log = get_logger(__name__)

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
_NAME_RE = re.compile(r"^iter_(\d{7,})$")
_FORMAT_VERSION = 1
# Megatron-LM's default optimizer format: each DP rank writes its own shard (no gather), and a resume
# must keep the TP/PP layout. ("fully_reshardable" would not tie it to a layout, but megatron-core
# 0.16.1 cannot load it into torch's own Adam, used when apex/TE are absent: a KeyError on 'step'.)
OPTIMIZER_SHARDING = "dp_reshardable"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass
class TrainerState:
    """What the loop needs besides tensors to continue exactly where it stopped."""

    iteration: int                      # optimizer steps done
    consumed_samples: int = 0           # global training sequences consumed
    sampler: dict = field(default_factory=dict)  # the data sampler's state_dict()
    world_size: int = 1                 # RNG states are per rank: restored only at the same size
    extra: dict = field(default_factory=dict)    # free-form (e.g. best eval metric)
    layout: dict = field(default_factory=dict)   # the saver's model-parallel layout (see optimizer_layout)

    def to_json(self) -> dict:
        return {"format_version": _FORMAT_VERSION, "iteration": self.iteration,
                "consumed_samples": self.consumed_samples, "sampler": self.sampler,
                "world_size": self.world_size, "extra": self.extra, "layout": self.layout}

    @classmethod
    def from_json(cls, data: dict) -> TrainerState:
        return cls(iteration=int(data["iteration"]), consumed_samples=int(data["consumed_samples"]),
                   sampler=dict(data.get("sampler", {})), world_size=int(data.get("world_size", 1)),
                   extra=dict(data.get("extra", {})), layout=dict(data.get("layout", {})))


def optimizer_layout(optimizer) -> dict:
    """What the optimizer state's on-disk form depends on: with megatron's distributed optimizer it is
    flattened per grad-buffer bucket (dp_reshardable), so TP/PP/EP/VPP must match on resume (DP may
    change); the plain optimizer's state is sharded like the parameters and loads under any layout."""
    layout = {"distributed_optimizer": any(
        isinstance(opt, DistributedOptimizer) for opt in getattr(optimizer, "chained_optimizers", [optimizer]))}
    if ps.model_parallel_is_initialized():
        layout.update(tp=ps.get_tensor_model_parallel_world_size(),
                      pp=ps.get_pipeline_model_parallel_world_size(),
                      ep=ps.get_expert_model_parallel_world_size(),
                      vpp=ps.get_virtual_pipeline_model_parallel_world_size())
    return layout


def check_optimizer_layout(path: str, saved: dict, current: dict) -> None:
    """Refuses, before megatron's shape errors, a resume whose distributed-optimizer state cannot load."""
    if not saved or not (saved.get("distributed_optimizer") or current.get("distributed_optimizer")):
        return
    keys = ("distributed_optimizer", "tp", "pp", "ep", "vpp")
    if any(saved.get(k) != current.get(k) for k in keys):
        def fmt(layout):
            return " ".join(f"{k}={layout.get(k)}" for k in keys)

        raise ValueError(
            f"checkpoint {path} holds optimizer state saved with {fmt(saved)}; this run has {fmt(current)}. "
            "Distributed-optimizer state is tied to the TP/PP/EP/VPP layout (DP may change): resume with "
            f"the saved layout, or start from its weights only with model.load={path} (fresh optimizer)")


# ---------------------------------------------------------------- finding checkpoints

def is_complete(path: str) -> bool:
    """A finished checkpoint: its final name, megatron's metadata and our trainer state are there."""
    return (bool(_NAME_RE.match(os.path.basename(os.path.normpath(path))))
            and os.path.isfile(os.path.join(path, "metadata.json"))
            and os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)))


def list_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in save_dir as (iteration, path), oldest first (`.tmp` dirs excluded)."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        m = _NAME_RE.match(name)
        path = os.path.join(save_dir, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_latest(save_dir: str) -> str | None:
    """The newest complete checkpoint: the one `latest` names if complete, else the newest on disk."""
    found = list_checkpoints(save_dir)
    if not found:
        return None
    pointer = os.path.join(save_dir, LATEST_FILE)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            named = os.path.join(save_dir, f.read().strip())
        # the pointer lags if a run died right after a rename: never prefer an older checkpoint
        if is_complete(named) and os.path.normpath(named) == os.path.normpath(found[-1][1]):
            return named
    return found[-1][1]


def resolve_resume(resume: str, save_dir: str) -> str | None:
    """train.resume -> a checkpoint path or None. auto: newest in save_dir (None on a fresh run);
    none: None; a path: that checkpoint, or the newest inside it if it is a save_dir."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(save_dir)
    if is_complete(resume):
        return resume
    latest = find_latest(resume)
    if latest is None:
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint and holds none")
    return latest


def prune_checkpoints(save_dir: str, keep_last_n: int) -> list[str]:
    """Delete all but the newest keep_last_n complete checkpoints (0 keeps all), and stale .tmp dirs."""
    removed = []
    if os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            if name.endswith(".tmp") and _NAME_RE.match(name[:-4]):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
                removed.append(name)
    found = list_checkpoints(save_dir)
    if keep_last_n > 0:
        for _, path in found[:-keep_last_n]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(os.path.basename(path))
    return removed


# ---------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """Python, numpy, torch (CPU and CUDA) and megatron's model-parallel tracker states, as plain
    values and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ---------------------------------------------------------------- sharded state dict

def _unwrap(chunk):
    return getattr(chunk, "module", chunk)  # DDP -> the GPTModel


def _model_keys(model_chunks: list) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def sharded_state_dict(model_chunks: list, optimizer=None, scheduler=None, rng: dict | None = None,
                       is_loading: bool = False) -> dict:
    """The dict dist_checkpointing saves/loads (the same shape on both sides, as it requires)."""
    state: dict[str, Any] = {"checkpoint_version": _FORMAT_VERSION}
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        state[key] = _unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING})
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng is not None:
        rank, world = dist.get_rank(), dist.get_world_size()
        state["rng_state"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    return state


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state until its first step, and megatron's DistributedOptimizer
    cannot describe (so cannot load) an empty one without apex/TE; megatron's own remedy is one step on
    zero grads, whose effect the loaded state then replaces."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and len(inner.state) == 0 and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def _saved_adam_steps(loaded_optimizer) -> set:
    """The 'step' values megatron stored in the checkpoint's param groups (non-apex/TE Adam)."""
    steps = set()
    if isinstance(loaded_optimizer, dict):
        for key, value in loaded_optimizer.items():
            if key == "param_groups" and isinstance(value, list):
                steps |= {g["step"] for g in value if isinstance(g, dict) and g.get("step") is not None}
            else:
                steps |= _saved_adam_steps(value)
    return steps


def _restore_adam_steps(optimizer, loaded_optimizer) -> None:
    """megatron-core 0.16.1 with torch's own Adam (no apex/TE) restores the per-parameter 'step'
    wrongly: the dp_reshardable path copies this process's placeholder step over the saved one, and
    the param-group path makes every parameter share ONE tensor, which torch then increments once per
    parameter. Either skews Adam's bias correction after a resume; set each parameter its own copy
    of the saved count."""
    steps = _saved_adam_steps(loaded_optimizer)
    if not steps:
        return  # apex/TE optimizers keep the step in their param groups, which megatron restores
    if len(steps) != 1:
        raise RuntimeError(f"checkpoint holds several optimizer step counts: {sorted(steps)}")
    step = float(steps.pop())
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.full_like(state["step"], step)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- save / load

def save_checkpoint(save_dir: str, trainer_state: TrainerState, model_chunks: list, optimizer=None,
                    scheduler=None, keep_last_n: int = 0,
                    write_extra: Callable[[str], None] | None = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path. write_extra(dir) runs on
    rank 0 before the rename (e.g. the HF config and tokenizer that make the checkpoint
    self-describing for the converters)."""
    name = checkpoint_name(trainer_state.iteration)
    final, tmp = os.path.join(save_dir, name), os.path.join(save_dir, name + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt that died
        os.makedirs(tmp)
    _barrier()
    state = sharded_state_dict(model_chunks, optimizer, scheduler, capture_rng_state())
    dist_checkpointing.save(state, tmp)
    _barrier()
    if rank0:
        trainer_state.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if optimizer is not None:
            trainer_state.layout = optimizer_layout(optimizer)
        if write_extra is not None:
            write_extra(tmp)
        write_text_atomic(os.path.join(tmp, TRAINER_STATE_FILE),
                           json.dumps(trainer_state.to_json(), indent=2, sort_keys=True) + "\n")
        if os.path.exists(final):  # re-saving the same iteration (e.g. final save after an interval save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(os.path.join(save_dir, LATEST_FILE), name + "\n")
        removed = prune_checkpoints(save_dir, keep_last_n)
        log.info("saved checkpoint %s%s", final, f" (removed {', '.join(removed)})" if removed else "")
    _barrier()
    return final


def read_trainer_state(path: str) -> TrainerState:
    with open(os.path.join(path, TRAINER_STATE_FILE), encoding="utf-8") as f:
        return TrainerState.from_json(json.load(f))


def load_checkpoint(path: str, model_chunks: list, optimizer=None, scheduler=None,
                    load_rng: bool = True) -> TrainerState:
    """Collective. Loads what is given (model only when optimizer/scheduler are None) and returns the
    trainer state. RNG states are restored when load_rng and the world size matches the saver's."""
    trainer_state = read_trainer_state(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    with_rng = load_rng and trainer_state.world_size == world
    if load_rng and not with_rng:
        log.warning("checkpoint %s was saved by %d ranks, this run has %d: RNG states not restored",
                    path, trainer_state.world_size, world)
    if optimizer is not None:
        check_optimizer_layout(path, trainer_state.layout, optimizer_layout(optimizer))
        _materialise_optimizer_state(optimizer)
    template = sharded_state_dict(model_chunks, optimizer, scheduler,
                                  capture_rng_state() if with_rng else None, is_loading=True)
    if scheduler is not None:
        template.pop("opt_param_scheduler")  # plain value: comes from common.pt
    loaded = dist_checkpointing.load(template, path)
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        # megatron copies into main params (views of fp32 model params) in place; it marks only some
        # of its load paths no_grad
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        restore_rng_state(loaded["rng_state"])
    log.info("loaded checkpoint %s (iteration %d%s)", path, trainer_state.iteration,
             "" if optimizer is not None else ", weights only")
    return trainer_state


def save_weights(path: str, model_chunks: list, write_extra: Callable[[str], None] | None = None) -> str:
    """Collective: the model weights alone as a dist checkpoint at `path` (written to `path.tmp`,
    then renamed), e.g. LoRA-merged weights for export."""
    tmp = path + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(sharded_state_dict(model_chunks), tmp)
    _barrier()
    if rank0:
        if write_extra is not None:
            write_extra(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    _barrier()
    return path


def load_weights(path: str, model_chunks: list) -> None:
    """Only the model weights of a checkpoint (model.load): fine-tuning from another run."""
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):
        template = sharded_state_dict(model_chunks, is_loading=True)
        loaded = dist_checkpointing.load(template, path)
        for key, chunk in zip(_model_keys(model_chunks), model_chunks):
            _unwrap(chunk).load_state_dict(loaded[key], strict=True)
        return
    load_checkpoint(path, model_chunks, load_rng=False)

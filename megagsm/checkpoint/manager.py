"""Trainer checkpoints: megatron dist_checkpointing (torch_dist) of the model, the optimizer, the LR
scheduler, the data position and every RNG state, written atomically; every trainer saves and loads
through `CheckpointManager`.

Layout of `save_dir`:

    iter_0000100/          a complete checkpoint (dist_checkpointing files, trainer_state.json,
                           the HF side files in hf/ and the manifest: see checkpoint.manifest)
    iter_0000200.tmp/      a save in progress or killed mid-way: never read, removed at resume and
                           by the next save
    latest                 "iter_0000200": written (atomically) after the rename

A checkpoint directory gets its final name only by `os.replace` from `.tmp` once every rank has
finished writing, so a complete-looking name is a complete checkpoint. `latest` is a hint: if a run
dies between the rename and the `latest` update, `find_latest` still picks the newest complete dir.

Model and optimizer tensors are layout-free (megatron's sharded state dicts), so a checkpoint loads
under another TP/PP/DP layout (the distributed optimizer's state excepted, see optimizer_state); RNG
states are per rank and restored only under the same world size. `common.pt` (megatron's non-tensor
part) is read with torch.load's weights_only default, so everything in it is plain values and tensors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megagsm.checkpoint.integrity import verify_checkpoint_collective
from megagsm.checkpoint.model_weights import (load_mcore_checkpoint, load_model_state, model_keys,
                                              model_sharded_state_dict, stored_metadata)
from megagsm.checkpoint.optimizer_state import (OPTIMIZER_SHARDING, check_optimizer_layout,
                                                materialise_optimizer_state, optimizer_has_state,
                                                optimizer_layout, restore_adam_steps)
from megagsm.checkpoint.rng import capture_rng_state, restore_rng_state
from megagsm.checkpoint.safe_pickle import reraise_user_errors
from megagsm.errors import UserError
from megagsm.runtime.collectives import barrier
from megagsm.utils.atomic import write_text_atomic
from megagsm.utils.logging import get_logger
from megagsm.utils.rank import is_rank0

log = get_logger(__name__)

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
_NAME_RE = re.compile(r"^iter_(\d{7,})$")
_FORMAT_VERSION = 1


class CheckpointNotFound(UserError, FileNotFoundError):
    """A checkpoint path (train.resume, model.load) that holds no checkpoint."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass
class TrainerState:
    """What the loop needs besides tensors to continue exactly where it stopped."""

    iteration: int                      # optimizer steps done (GSPO: trainer steps)
    consumed_samples: int = 0           # global training sequences (GSPO: prompts) consumed
    sampler: dict = field(default_factory=dict)  # the data position (the algorithm's data_state())
    world_size: int = 1                 # RNG states are per rank: restored only at the same size
    extra: dict = field(default_factory=dict)    # e.g. optimizer_saved
    layout: dict = field(default_factory=dict)   # the saver's model-parallel layout (optimizer_layout)

    def to_json(self) -> dict:
        return {"format_version": _FORMAT_VERSION, "iteration": self.iteration,
                "consumed_samples": self.consumed_samples, "sampler": self.sampler,
                "world_size": self.world_size, "extra": self.extra, "layout": self.layout}

    @classmethod
    def from_json(cls, data: dict) -> TrainerState:
        return cls(iteration=int(data["iteration"]), consumed_samples=int(data["consumed_samples"]),
                   sampler=dict(data.get("sampler", {})), world_size=int(data.get("world_size", 1)),
                   extra=dict(data.get("extra", {})), layout=dict(data.get("layout", {})))


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
    return resolve_checkpoint(resume, "train.resume")


def resolve_checkpoint(path: str, field_name: str = "model.load") -> str:
    """A checkpoint to read weights from: a trainer save_dir (its newest checkpoint), a trainer
    checkpoint, or any megatron torch_dist model checkpoint (converter output)."""
    if is_complete(path):
        return path
    latest = find_latest(path)
    if latest is not None:
        return latest
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    raise CheckpointNotFound(f"{field_name}={path}: not a megatron checkpoint, nor a directory holding "
                             "complete ones")


def remove_stale_tmp(save_dir: str) -> list[str]:
    """Removes `.tmp` dirs of saves that died (rank 0 only), so a full disk is freed before a resume."""
    removed = []
    if is_rank0() and os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            if name.endswith(".tmp") and _NAME_RE.match(name[:-4]):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
                removed.append(name)
    return removed


def prune_checkpoints(save_dir: str, keep_last_n: int) -> list[str]:
    """Delete all but the newest keep_last_n complete checkpoints (0 keeps all), and stale .tmp dirs."""
    removed = remove_stale_tmp(save_dir)
    found = list_checkpoints(save_dir)
    if keep_last_n > 0:
        for _, path in found[:-keep_last_n]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(os.path.basename(path))
    return removed


def read_trainer_state(path: str) -> TrainerState:
    with open(os.path.join(path, TRAINER_STATE_FILE), encoding="utf-8") as f:
        return TrainerState.from_json(json.load(f))


# ---------------------------------------------------------------- save / load

def sharded_state_dict(model_chunks: list, optimizer=None, scheduler=None, rng: dict | None = None,
                       is_loading: bool = False) -> dict:
    """The dict dist_checkpointing saves/loads (the same shape on both sides, as it requires)."""
    state: dict[str, Any] = {"checkpoint_version": _FORMAT_VERSION, **model_sharded_state_dict(model_chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING})
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng is not None:
        rank, world = dist.get_rank(), dist.get_world_size()
        state["rng_state"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    return state


def save_checkpoint(save_dir: str, trainer_state: TrainerState, model_chunks: list, optimizer=None,
                    scheduler=None, keep_last_n: int = 0,
                    write_extra: Callable[[str], None] | None = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path. The optimizer's state is
    saved only once it has any (recorded as extra.optimizer_saved). write_extra(dir) runs on rank 0
    before the rename (the HF side files and manifest that make the checkpoint self-describing)."""
    name = checkpoint_name(trainer_state.iteration)
    final, tmp = os.path.join(save_dir, name), os.path.join(save_dir, name + ".tmp")
    if optimizer is not None and not optimizer_has_state(optimizer):
        # megatron cannot describe an empty Adam state, and its stand-in (a step on zero grads)
        # would move the weights (weight decay): such a checkpoint holds none, and says so
        optimizer = None
        trainer_state.extra["optimizer_saved"] = False
    elif optimizer is not None:
        trainer_state.extra["optimizer_saved"] = True
    if is_rank0():
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt that died
        os.makedirs(tmp)
    barrier()
    state = sharded_state_dict(model_chunks, optimizer, scheduler, capture_rng_state())
    dist_checkpointing.save(state, tmp)
    barrier()
    if is_rank0():
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
    barrier()
    return final


def load_checkpoint(path: str, model_chunks: list, optimizer=None, scheduler=None,
                    load_rng: bool = True) -> TrainerState:
    """Collective. Loads what is given (model only when optimizer/scheduler are None; the optimizer
    only if the checkpoint holds its state) and returns the trainer state. RNG states are restored
    when load_rng and the world size matches the saver's."""
    trainer_state = read_trainer_state(path)
    if not trainer_state.extra.get("optimizer_saved", True):
        optimizer = None
    world = dist.get_world_size() if dist.is_initialized() else 1
    with_rng = load_rng and trainer_state.world_size == world
    if load_rng and not with_rng:
        log.warning("checkpoint %s was saved by %d ranks, this run has %d: RNG states not restored",
                    path, trainer_state.world_size, world)
    if optimizer is not None:
        check_optimizer_layout(path, trainer_state.layout, optimizer_layout(optimizer))
        materialise_optimizer_state(optimizer)
    verify_checkpoint_collective(path)  # every shard there and whole before megatron opens any
    template = sharded_state_dict(model_chunks, optimizer, scheduler,
                                  capture_rng_state() if with_rng else None, is_loading=True)
    if scheduler is not None:
        template.pop("opt_param_scheduler")  # plain value: comes from common.pt
    with reraise_user_errors():
        loaded = dist_checkpointing.load(template, path)
    load_model_state(model_chunks, loaded, stored_metadata(path), path)
    if optimizer is not None:
        # megatron copies into main params (views of fp32 model params) in place; it marks only some
        # of its load paths no_grad
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_steps(optimizer, loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        restore_rng_state(loaded["rng_state"])
    log.info("loaded checkpoint %s (iteration %d%s)", path, trainer_state.iteration,
             "" if optimizer is not None else ", weights only")
    return trainer_state


class CheckpointManager:
    """One run's checkpoints: where they go, how many are kept, what side files they carry."""

    def __init__(self, save_dir: str, keep_last_n: int = 0, write_extra: Callable[[str], None] | None = None):
        self.save_dir, self.keep_last_n, self.write_extra = save_dir, keep_last_n, write_extra
        self.latest: str | None = None

    def resume_path(self, resume: str) -> str | None:
        """train.resume -> the checkpoint to continue from; stale `.tmp` dirs are cleared first."""
        remove_stale_tmp(self.save_dir)
        barrier()
        return resolve_resume(resume, self.save_dir)

    def save(self, state: TrainerState, model_chunks: list, optimizer, scheduler) -> str:
        self.latest = save_checkpoint(self.save_dir, state, model_chunks, optimizer, scheduler,
                                      keep_last_n=self.keep_last_n, write_extra=self.write_extra)
        return self.latest

    def load(self, path: str, model_chunks: list, optimizer, scheduler) -> TrainerState:
        self.latest = path
        return load_checkpoint(path, model_chunks, optimizer, scheduler)

    @staticmethod
    def load_weights(path: str, model_chunks: list) -> str:
        """model.load: the weights alone of a checkpoint (or the newest in a save_dir); returns its path."""
        path = resolve_checkpoint(path)
        load_mcore_checkpoint(model_chunks, path)
        log.info("initial weights from %s", path)
        return path


__all__ = ["CheckpointManager", "CheckpointNotFound", "TrainerState", "checkpoint_name", "find_latest", "is_complete",
           "list_checkpoints", "load_checkpoint", "model_keys", "prune_checkpoints", "read_trainer_state",
           "resolve_checkpoint", "resolve_resume", "save_checkpoint"]

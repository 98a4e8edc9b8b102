"""What saving and loading megatron's optimizer state needs beyond megatron's own calls.

- Its on-disk form: with the distributed optimizer it is flattened per grad-buffer bucket
  (dp_reshardable, Megatron-LM's default), so TP/PP/EP/VPP must match on resume (DP may change); the
  plain optimizer's state is sharded like the parameters and loads under any layout.
- torch's Adam (used when apex/TE are absent) has no state before its first step, which megatron
  cannot describe; and megatron-core 0.16.1 restores its per-parameter 'step' wrongly.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megagsm.errors import UserError
from megagsm.runtime.collectives import all_ranks_true

# ("fully_reshardable" would not tie the state to a layout, but megatron-core 0.16.1 cannot load it
# into torch's own Adam: a KeyError on 'step'.)
OPTIMIZER_SHARDING = "dp_reshardable"
_LAYOUT_KEYS = ("distributed_optimizer", "tp", "pp", "ep", "vpp")


def _megatron_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_layout(optimizer) -> dict:
    """What the optimizer state's on-disk form depends on (see the module doc)."""
    layout = {"distributed_optimizer": any(isinstance(o, DistributedOptimizer) for o in _megatron_optimizers(optimizer))}
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
    if any(saved.get(k) != current.get(k) for k in _LAYOUT_KEYS):
        def fmt(layout):
            return " ".join(f"{k}={layout.get(k)}" for k in _LAYOUT_KEYS)

        raise UserError(
            f"checkpoint {path} holds optimizer state saved with {fmt(saved)}; this run has {fmt(current)}. "
            "Distributed-optimizer state is tied to the TP/PP/EP/VPP layout (DP may change): resume with "
            f"the saved layout, or start from its weights only with model.load={path} (fresh optimizer)")


def optimizer_has_state(optimizer) -> bool:
    """Whether Adam holds state on every rank (false until the first step: a GSPO run whose groups all
    had equal rewards so far). Collective: every rank must take the same branch of a save."""
    inner = [getattr(o, "optimizer", None) for o in _megatron_optimizers(optimizer)]
    return all_ranks_true(any(o is not None and len(o.state) > 0 for o in inner))


def materialise_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state until its first step, and megatron's DistributedOptimizer
    cannot describe (so cannot load) an empty one without apex/TE; megatron's own remedy is one step on
    zero grads, whose effect the loaded state then replaces."""
    for opt in _megatron_optimizers(optimizer):
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


def restore_adam_steps(optimizer, loaded_optimizer) -> None:
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
    for opt in _megatron_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.full_like(state["step"], step)

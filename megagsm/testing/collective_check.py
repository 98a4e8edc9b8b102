"""NCCL's device rule, emulated on CPU: every collective the project issues must get tensors the
group's backend can serve.

On a GPU the default group is "cpu:gloo,cuda:nccl" (both devices) and megatron's subgroups are NCCL
(CUDA tensors only); under gloo on CPU every device "works", so a CPU tensor headed for an NCCL group
goes unnoticed until the first GPU run. `nccl_emulation()` makes the difference visible:

- `collectives.backend_name` answers "cpu:gloo,cuda:nccl" for the default group and "nccl" for every
  other group (megatron's), as on a GPU;
- `collectives.on_backend_device` (the one place operands are moved) remembers the copies it makes
  for a group whose backend is NCCL: those are the tensors a GPU run would have moved to the GPU;
- every torch.distributed collective is wrapped. A call from runtime/collectives.py on an NCCL-only
  group must have an operand `on_backend_device` made; a call from anywhere else in the project is a
  violation unless it is one of HOT_PATH_SITES (reductions on model-device tensors inside the
  forward/generation kernels, which must stay on the model device); megatron's and torch's own
  calls are theirs to get right and are not checked.

A new `dist.all_reduce(torch.tensor(...), group=...)` anywhere in an SFT step, GSPO step, conversion,
evaluation or generation is therefore reported (tests/test_collective_devices.py plants one to prove
it). What this cannot check on CPU: that a hot-path site's tensor really is on the model device.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import weakref

import torch.distributed as dist

from megagsm.runtime import collectives

EMULATED_DEFAULT_BACKEND = "cpu:gloo,cuda:nccl"

# (module, function) pairs allowed to call torch.distributed directly: each reduces or sends tensors
# that live on the model device (logits, hidden states, sampled tokens), in the inner loops.
HOT_PATH_SITES = frozenset({
    ("megagsm.generation.engine", "_Generation._max_over_ranks"),
    ("megagsm.generation.engine", "_Generation._anyone_active"),
    ("megagsm.generation.forward", "StageRunner.forward"),
    ("megagsm.generation.forward", "StageRunner.share"),
    ("megagsm.models.forward", "forward_logits"),
    ("megagsm.rl.logprobs", "token_entropy"),
    ("megagsm.sft.fused_ce", "_ChunkedVocabParallelCrossEntropy.forward"),
})

TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce", "gather",
                      "scatter", "send", "recv", "isend", "irecv")
OTHER_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                     "barrier", "monitored_barrier")
PROJECT_PACKAGES = ("megagsm", "launch", "checkpoints_tools", "bench", "__main__")


def _is_default(group) -> bool:
    return group is None or group is dist.group.WORLD or group == dist.GroupMember.WORLD


@functools.lru_cache(maxsize=None)
def _signature(real) -> inspect.Signature:
    return inspect.signature(real)


def _group_of(real, args, kwargs):
    """The `group` argument of a call to `real`, passed by name or by position (None: default)."""
    try:
        return _signature(real).bind_partial(*args, **kwargs).arguments.get("group")
    except (TypeError, ValueError):
        return kwargs.get("group")


def _operands(args, kwargs):
    found = [a for a in args if hasattr(a, "device") and hasattr(a, "data_ptr")]
    for a in args:
        if isinstance(a, (list, tuple)):
            found += [t for t in a if hasattr(t, "device") and hasattr(t, "data_ptr")]
    found += [v for k, v in kwargs.items() if k in ("tensor", "output", "input") and hasattr(v, "device")]
    return found


class Emulation:
    def __init__(self):
        self.moved: dict[int, weakref.ref] = {}  # id -> the copy (tensors compare elementwise, not by identity)
        self.violations: list[str] = []
        self.checked: dict[str, int] = {}

    def backend_name(self, group=None) -> str:
        return EMULATED_DEFAULT_BACKEND if _is_default(group) else "nccl"

    def on_backend_device(self, real):
        def move(tensor, group=None):
            out = real(tensor, group)
            if self.backend_name(group) == "nccl":
                self.moved[id(out)] = weakref.ref(out)
            return out
        return move

    def wrap(self, name, real):
        def collective(*args, **kwargs):
            frame = sys._getframe(1)
            self.check(name, frame.f_globals.get("__name__", "?"), frame.f_code.co_qualname,
                       _group_of(real, args, kwargs), args, kwargs)
            return real(*args, **kwargs)
        collective.__wrapped__ = real
        return collective

    def check(self, name, module, function, group, args, kwargs):
        if not module.startswith(PROJECT_PACKAGES):
            return  # megatron's and torch's own collectives
        where = f"{module}.{function}: dist.{name}"
        self.checked[where] = self.checked.get(where, 0) + 1
        if module == collectives.__name__:
            if name in TENSOR_COLLECTIVES and self.backend_name(group) == "nccl":
                stray = [t for t in _operands(args, kwargs)
                         if id(t) not in self.moved or self.moved[id(t)]() is not t]
                if stray:
                    self.violations.append(f"{where} on an NCCL group with a tensor not moved by "
                                           f"collectives.on_backend_device (device {stray[0].device})")
            return
        if (module, function) in HOT_PATH_SITES:
            return
        self.violations.append(f"{where} outside megagsm.runtime.collectives (group "
                               f"{self.backend_name(group)})")


@contextlib.contextmanager
def nccl_emulation():
    """Yields the Emulation whose `violations` list every collective that breaks the rule."""
    emu = Emulation()
    saved = {name: getattr(dist, name) for name in TENSOR_COLLECTIVES + OTHER_COLLECTIVES if hasattr(dist, name)}
    saved_backend, saved_move = collectives.backend_name, collectives.on_backend_device
    collectives.backend_name = emu.backend_name
    collectives.on_backend_device = emu.on_backend_device(saved_move)
    for name, real in saved.items():
        setattr(dist, name, emu.wrap(name, real))
    try:
        yield emu
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)
        collectives.backend_name, collectives.on_backend_device = saved_backend, saved_move

"""Lets unmodified megatron-core 0.16.1 run on a machine without CUDA.

megatron-core assumes a GPU in a few dozen places (see shared/notes/megatron-on-cpu.md): it asks
`torch.cuda.current_device()` for a device, creates tensors with a literal `device="cuda"`, keeps its
model-parallel RNG streams as CUDA generator states, synchronises on CUDA streams/events and checks
`param.type() == "torch.cuda.FloatTensor"` in its optimizers. Rather than fork megatron, this module
redirects those calls to the CPU, in one place:

* `torch.cuda.current_device/Stream/Event/stream/current_stream/synchronize` and the CUDA RNG calls
  are replaced by CPU equivalents (the "CUDA" RNG becomes torch's default CPU generator, so megatron's
  RNG tracker forks the generator that CPU ops actually draw from);
* a `TorchFunctionMode` rewrites `device="cuda"` arguments, `Tensor.cuda()` and `Tensor.to("cuda")` to
  the CPU, and reports CPU float tensors under their CUDA type names to megatron's optimizer checks;
* two megatron helpers that only work with CUDA tensors are wrapped (MoE all-to-all split sizes).

It is installed only when CUDA is absent, and refuses to install on a megatron-core version it was
not written for: a newer megatron may move these call sites, and a silent half-patch would be worse
than a clear error.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON_VERSIONS = ("0.16.1",)

_installed = False
_mode: "_CudaToCpuMode | None" = None

_CPU = torch.device("cpu")
# CPU tensor type name -> the CUDA name megatron's optimizers check for.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class CpuCompatError(RuntimeError):
    pass


def is_installed() -> bool:
    return _installed


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() ints as devices
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _FakeStream:
    """Stands in for torch.cuda.Stream: CPU work is synchronous, so every wait is already satisfied."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _FakeEvent()

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _FakeStream)

    def __hash__(self):
        return 0


class _FakeEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_DEFAULT_STREAM = _FakeStream()


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _FakeStream
    cuda.Event = _FakeEvent
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    # megatron's "CUDA" RNG streams become states of the default CPU generator
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    # torch.manual_seed itself calls cuda.manual_seed_all after seeding the CPU generator
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0


def _patch_megatron():
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    # Inside a forked RNG region the tracker compares the CPU generator before and after and warns
    # when it moved; here the "CUDA" generator *is* the CPU one, so that warning is always noise.
    logging.getLogger(mp_random.__name__).setLevel(logging.ERROR)

    original_move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # The all-to-all dispatcher wants its split sizes as numpy; upstream converts only CUDA tensors.
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def fix_missing_transformer_engine():
    """megatron-core 0.16.1 references `te_general_gemm` in the MoE router even when
    transformer-engine failed to import (NameError). Needed on GPU machines without TE too."""
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", False) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # multi-latent attention decides HAVE_TE from an import that succeeds without TE (megatron's
    # extension module stubs it), then calls isinstance(linear, TELinear) with a non-type
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.transformer import multi_latent_attention

    if not te_extension.HAVE_TE:
        multi_latent_attention.HAVE_TE = False


def check_megatron_version():
    from megatron.core import package_info

    version = package_info.__version__
    if version not in SUPPORTED_MEGATRON_VERSIONS:
        raise CpuCompatError(
            f"megagsm's CPU compatibility layer was written for megatron-core "
            f"{', '.join(SUPPORTED_MEGATRON_VERSIONS)}, found {version}: its CUDA call sites may have "
            f"moved. Pin megatron-core==0.16.1 for CPU runs, or run on a GPU."
        )


def install(force: bool = False) -> bool:
    """Install the CPU layer when CUDA is absent (or `force`). Returns whether it is active."""
    global _installed, _mode
    fix_missing_transformer_engine()
    if _installed:
        return True
    if torch.cuda.is_available() and not force:
        return False
    check_megatron_version()
    _patch_torch_cuda()
    _patch_megatron()
    _mode = _CudaToCpuMode()
    # Entered for the life of the process: megatron's CUDA placements can happen at any time.
    _mode.__enter__()
    _installed = True
    return True


@contextlib.contextmanager
def suspended():
    """Runs the body without the TorchFunctionMode (the module-level patches stay active).

    The mode costs a Python call on every torch function (~1 us each, hundreds per decoding step).
    Hot loops whose megatron code paths were checked to create no tensor with a literal CUDA device
    (generation's forward steps, see megagsm.generation) run under this to drop that cost. A no-op
    when the layer is not installed or another mode sits on top of ours (a profiler, FakeTensorMode).
    """
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if not _installed or _mode is None or _get_current_function_mode() is not _mode:
        yield
        return
    with _pop_mode_temporarily():
        yield

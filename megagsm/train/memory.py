"""Training memory released while the policy generates its rollouts (`generation.release_training_memory`).

During generation the KV cache competes with state only the optimizer step needs: megatron's grad
buffers (fp32 with grad_reduce_in_fp32: 4 B per parameter) and the optimizer state (fp32 main params
+ Adam m and v: 12 B per parameter, / DP with the distributed optimizer). megatron-core 0.16.1 has
both halves:
- `DistributedDataParallel.offload_grad_buffers(synchronize, empty_cache)` frees each grad buffer's
  storage (`resize_(0)`; `param.main_grad` views stay valid objects) and `restore_grad_buffers()`
  reallocates and zeroes it. Works on CPU too (the storage is freed); `synchronize`/`empty_cache`
  call CUDA, so they are passed only on GPU. The grads are dead at that point: every train step
  zeroes the buffer before its backward.
- `MegatronOptimizer.offload_to_cpu()` / `restore_from_cpu()` (ChainedOptimizer: each part) move the
  optimizer's CUDA param-group tensors and state to host memory and back with `.cuda()`. On a CPU
  run nothing is on CUDA (offload moves nothing, restore would move everything to CUDA), so it is
  used only when the model lives on CUDA, and only when no optimizer parameter aliases model
  storage: with fp32 params (no mixed precision) megatron's optimizer steps the model's own
  parameters (or views of DDP's param buffer), and moving those would move the model's weights off
  the GPU it generates on.
Caches are emptied after releasing, so the KV-cache budget (generation.kv_cache) sees the memory.
Everything is restored before the log-prob pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def release_enabled(setting: bool | None, device: torch.device) -> bool:
    """generation.release_training_memory: None is true on GPU, false on CPU."""
    return (device.type == "cuda") if setting is None else bool(setting)


def _megatron_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 0}


def optimizer_params(optimizer) -> list[torch.Tensor]:
    return [p for opt in _megatron_optimizers(optimizer) if getattr(opt, "optimizer", None) is not None
            for group in opt.optimizer.param_groups for p in group["params"]]


def optimizer_offload_is_safe(model_chunks, optimizer) -> bool:
    """True when the model is on CUDA and no optimizer parameter shares storage with the model's."""
    model = [p for chunk in model_chunks for p in chunk.parameters()]
    if not model or model[0].device.type != "cuda":
        return False
    return not (_storages(model) & _storages(optimizer_params(optimizer)))


@dataclass(frozen=True)
class TrainingStateBytes:
    grad_buffers: int      # storage bytes of DDP's grad buffers, as allocated now
    optimizer_state: int   # optimizer state tensors (Adam m, v, step) on the model's device
    main_params: int       # optimizer parameters that are not model storage (fp32 master copies)
    device: str

    @property
    def total(self) -> int:
        return self.grad_buffers + self.optimizer_state + self.main_params


def _nbytes_on(tensors, device) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if isinstance(t, torch.Tensor) and t.device == device and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def training_state_bytes(model_chunks, optimizer) -> TrainingStateBytes:
    """Live bytes of what releasing frees, on the model's device."""
    model = [p for chunk in model_chunks for p in chunk.parameters()]
    device = model[0].device
    grads = sum(b.grad_data.untyped_storage().nbytes() for chunk in model_chunks
                for b in list(chunk.buffers) + list(chunk.expert_parallel_buffers) if b.grad_data is not None)
    state = [v for opt in _megatron_optimizers(optimizer) if getattr(opt, "optimizer", None) is not None
             for s in opt.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    model_storage = _storages(model)
    masters = [p for p in optimizer_params(optimizer) if p.untyped_storage().data_ptr() not in model_storage]
    return TrainingStateBytes(grads, _nbytes_on(state, device), _nbytes_on(masters, device), str(device))


def empty_device_cache() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def training_memory_released(model_chunks, optimizer, enabled: bool):
    """Grad buffers freed and the optimizer state offloaded inside the block; both back after it."""
    if not enabled:
        yield
        return
    on_gpu = next(p.device for chunk in model_chunks for p in chunk.parameters()).type == "cuda"
    offload_optimizer = optimizer_offload_is_safe(model_chunks, optimizer)
    for chunk in model_chunks:
        chunk.offload_grad_buffers(synchronize=on_gpu, empty_cache=False)
    if offload_optimizer:
        optimizer.offload_to_cpu()
    empty_device_cache()
    try:
        yield
    finally:
        if offload_optimizer:
            optimizer.restore_from_cpu()
        for chunk in model_chunks:
            chunk.restore_grad_buffers(synchronize=on_gpu)

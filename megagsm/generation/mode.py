"""Switching the training model into generation and back, on the same weights (no copy)."""
from __future__ import annotations

import contextlib

import torch


def unwrap(model):
    """The GPTModel inside a list of chunks / DDP / Float16Module wrappers."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(
                f"generation needs one model chunk per rank, got {len(model)} (virtual pipeline "
                "stages are not supported by megatron's inference path: set parallel.vpp=None)"
            )
        model = model[0]
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def generation_mode(model):
    """eval() + torch.inference_mode for the duration, then the previous train/eval state returns.

    Nothing is copied: the trainer's parameters are read in place (their main grads, optimizer state
    and DDP buffers are left untouched and stay resident). Training activations are already freed
    when backward returns; the KV cache allocated by generate() reuses that memory through the
    caching allocator and is dropped before this context exits.

    inference_mode (rather than no_grad) skips autograd's version counters and view tracking: ~10%
    of a CPU decoding step. Tensors created inside are "inference tensors" that autograd refuses
    later, so nothing made here may outlive the context inside the model: megatron memoises RoPE
    frequencies per sequence length (an lru_cache on RotaryEmbedding.forward), and those caches are
    cleared on exit; results are cloned by generate() before they are returned.
    """
    modules = list(model.modules())
    was_training = [m.training for m in modules]
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        for m, training in zip(modules, was_training):
            m.training = training
        _clear_memoised_forwards(modules)


def _clear_memoised_forwards(modules) -> None:
    for cls in {type(m) for m in modules}:
        for klass in cls.__mro__:
            clear = getattr(klass.__dict__.get("forward"), "cache_clear", None)
            if clear is not None:
                clear()

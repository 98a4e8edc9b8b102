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
    """eval() + no_grad for the duration, then the previous train/eval state is restored.

    Nothing is copied: the trainer's parameters are read in place (their main grads, optimizer state
    and DDP buffers are left untouched and stay resident). Training activations are already freed
    when backward returns; the KV cache allocated by generate() reuses that memory through the
    caching allocator and is dropped before this context exits.
    """
    modules = list(model.modules())
    was_training = [m.training for m in modules]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in zip(modules, was_training):
            m.training = training

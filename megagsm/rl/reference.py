"""The reference policy for the KL penalty (``algorithm.gspo.kl_coef > 0``): the initial weights.

Full fine-tuning (`ReferencePolicy`): no second model is built: the snapshot (on the host) is copied
into the trainer's own parameters for one forward-only pass and the current weights are copied back
afterwards, bit for bit. The cost is one host copy of this rank's parameter shards (`snapshot_bytes`),
a second one while swapped in, and two copies per step; GSPO recipes run with the KL term off, where
none of this exists.

LoRA (`FrozenBaseReference`): the initial policy is the frozen base itself (adapters start at B = 0
and the base never moves), so the reference is the same model with its adapters switched off
(`megagsm.models.lora.adapters_disabled`): no snapshot, no copies.
"""
from __future__ import annotations

import contextlib

import torch

from megagsm.models.lora import adapters_disabled


class ReferencePolicy:
    def __init__(self, model_chunks: list):
        self.params = [p for chunk in model_chunks for p in chunk.parameters()]
        self.snapshot = [p.detach().to("cpu", copy=True) for p in self.params]

    @property
    def snapshot_bytes(self) -> int:
        """Host bytes the snapshot holds for the whole run (the same again while swapped in)."""
        return sum(t.numel() * t.element_size() for t in self.snapshot)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        current = [p.detach().to("cpu", copy=True) for p in self.params]
        try:
            for p, ref in zip(self.params, self.snapshot):
                p.copy_(ref)
            yield
        finally:
            for p, cur in zip(self.params, current):
                p.copy_(cur)


class FrozenBaseReference:
    """The base model under LoRA: the adapters switched off for the duration."""

    snapshot_bytes = 0

    def __init__(self, model_chunks: list):
        self.model_chunks = model_chunks

    def swapped_in(self):
        return adapters_disabled(self.model_chunks)

"""The reference policy for the KL penalty (``algorithm.gspo.kl_coef > 0``): the initial weights.

No second model is built: the snapshot (on the host) is copied into the trainer's own parameters
for one forward-only pass and the current weights are copied back afterwards, bit for bit. The cost
is one host copy of this rank's parameter shards and two copies per step; GSPO recipes run with the
KL term off, where none of this exists.
"""
from __future__ import annotations

import contextlib

import torch


class ReferencePolicy:
    def __init__(self, model_chunks: list):
        self.params = [p for chunk in model_chunks for p in chunk.parameters()]
        self.snapshot = [p.detach().to("cpu", copy=True) for p in self.params]

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

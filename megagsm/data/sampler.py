"""A deterministic, resumable, data-parallel-sharded sampler.

Every epoch draws one global permutation from ``(seed, epoch)``; data-parallel rank ``r`` of ``D``
takes positions ``offset + r, offset + r + D, ...`` of it. The state is ``(epoch, offset)`` where
``offset`` counts *global* samples consumed in the epoch, so a run resumed from a saved state yields
exactly the indices it would have yielded, also with a different number of data-parallel ranks.

The state advances as indices are yielded. With ``DataLoader(num_workers=0)`` that is when batches
are taken; with worker processes the loader runs ahead by its prefetch, so save a state computed from
the trainer's own count instead: ``{"epoch": e, "offset": consumed_global_samples_in_epoch}``.
"""

from __future__ import annotations

from typing import Iterator

import torch


class ResumableShardedSampler(torch.utils.data.Sampler[int]):
    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        dp_rank: int = 0,
        dp_size: int = 1,
        drop_last: bool = True,
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        if drop_last and num_samples < dp_size:
            raise ValueError(f"num_samples={num_samples} < dp_size={dp_size} with drop_last: no rank gets a sample")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last
        self.epoch = 0
        self.offset = 0

    @property
    def epoch_length(self) -> int:
        """Global samples per epoch: a multiple of dp_size (dropping the tail, or wrapping to fill it)."""
        if self.drop_last:
            return (self.num_samples // self.dp_size) * self.dp_size
        return -(-self.num_samples // self.dp_size) * self.dp_size

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator()
        # Distinct stream per (seed, epoch); torch's CPU generator is reproducible across machines.
        generator.manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        """Indices this rank has left in the current epoch."""
        return max(0, self.epoch_length - self.offset - self.dp_rank + self.dp_size - 1) // self.dp_size

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation(self.epoch)
        length = self.epoch_length
        position = self.offset
        while position + self.dp_rank < length:
            index = int(perm[(position + self.dp_rank) % self.num_samples])
            position += self.dp_size
            self.offset = position
            yield index
        self.epoch += 1
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch`` (torch DistributedSampler's method)."""
        self.epoch, self.offset = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {key}={getattr(self, key)}; "
                    "resuming would visit different samples"
                )
        offset = int(state["offset"])
        if not 0 <= offset <= self.epoch_length:
            raise ValueError(f"sampler state offset={offset} is outside [0, {self.epoch_length}]")
        self.epoch, self.offset = int(state["epoch"]), offset

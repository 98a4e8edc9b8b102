"""Parallel layout: how the world is split into tensor/pipeline/expert/context/data groups."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    tp: int = 1                     # tensor model parallel size
    pp: int = 1                     # pipeline model parallel size
    ep: int = 1                     # expert model parallel size (MoE only)
    cp: int = 1                     # context parallel size
    etp: int | None = None          # expert tensor parallel size (None: same as tp)
    vpp: int | None = None          # virtual pipeline stages per rank (interleaved 1F1B)
    sequence_parallel: bool = False  # shard activations along the sequence in TP regions
    use_distributed_optimizer: bool = True
    backend: str = "auto"           # auto | nccl | gloo

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

"""Parallel layout: how the world is split into tensor/pipeline/expert/context/data groups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ParallelConfig:
    tp: int = 1                     # tensor model parallel size
    pp: int = 1                     # pipeline model parallel size
    ep: int = 1                     # expert model parallel size (MoE only)
    cp: int = 1                     # context parallel size
    etp: int | None = None          # expert tensor parallel size (None: same as tp)
    vpp: int | None = None          # virtual pipeline stages per rank (interleaved 1F1B)
    # Shard activations along the sequence in TP regions. Like Megatron-LM's argument parsing,
    # a request at tp=1 is not an error: it is ignored (see `sequence_parallel_active`), because
    # megatron-core's ModelParallelConfig itself raises on sequence_parallel with tp=1.
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Processes the layout is planned for (all nodes). 0: whatever the launch gives. When set, the
    # layout is checked against it before any launch (--print-config included), and a launch with
    # another WORLD_SIZE is refused.
    world_size: int = 0

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_tp(self) -> int:
        """Expert tensor parallel size with megatron's default applied (etp=None means tp)."""
        return self.tp if self.etp is None else self.etp

    @property
    def sequence_parallel_active(self) -> bool:
        """What to pass to megatron's TransformerConfig.sequence_parallel."""
        return self.sequence_parallel and self.tp > 1

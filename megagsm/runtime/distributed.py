"""Starts and stops torch.distributed + megatron's parallel_state the same way everywhere.

One call, `init_runtime(parallel, seed)`, works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*),
under Slurm's srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master from SLURM_* or MASTER_ADDR), and as a
plain single process. It picks the device (CUDA when present, else CPU with the compat layer), the
backend (on CUDA one default group serving both devices, "cpu:gloo,cuda:nccl"; gloo on CPU),
builds megatron's TP/PP/EP/CP/DP groups and seeds every RNG,
including megatron's model-parallel tracker.
"""
from __future__ import annotations

import os
import random
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megagsm.config.parallel import ParallelConfig
from megagsm.runtime import collectives, cpu_compat, cpu_malloc


@dataclass(frozen=True)
class RuntimeInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp_rank: int
    pp_rank: int
    ep_rank: int
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# megatron warns at import on every rank that TE/apex are absent; megagsm's own layers stand in for
# them (see megagsm.layers), so the warnings are noise in every log line of a CPU run.
for _pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                 ".*CUDA_DEVICE_MAX_CONNECTIONS.*", ".*full scope is deprecated.*"):
    warnings.filterwarnings("ignore", message=_pattern)


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, then Slurm, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _master_address() -> None:
    """Fill MASTER_ADDR/PORT when the launcher did not (Slurm srun, or a plain single process)."""
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        if nodelist:
            # "node[01-04],gpu7" -> first host of the first range; scontrol is the authoritative
            # tool but is not present inside every container, hence this simple parse.
            first = nodelist.split(",")[0]
            if "[" in first:
                prefix, rng = first.split("[", 1)
                first = prefix + rng.rstrip("]").split(",")[0].split("-")[0]
            os.environ["MASTER_ADDR"] = first
        else:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        if os.environ.get("SLURM_JOB_ID"):
            # every task of the job must agree without talking: derive the port from the job id
            os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
        else:
            os.environ["MASTER_PORT"] = str(_free_port())


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# On CUDA the default group must serve CPU tensors too (Python numbers reduced for metrics, object
# collectives, flags in checkpoint writes): an NCCL-only group rejects them ("No backend type
# associated with device type cpu"). megatron's own subgroups stay NCCL (runtime.collectives moves
# operands to the device a group's backend serves).
CUDA_DEFAULT_BACKEND = "cpu:gloo,cuda:nccl"


def default_backend(configured: str, device_type: str) -> str:
    """The backend string for init_process_group: `parallel.backend` ("auto" picks by device);
    "nccl" on CUDA means NCCL for CUDA tensors plus gloo for CPU ones."""
    if device_type == "cuda" and configured in ("auto", "nccl"):
        return CUDA_DEFAULT_BACKEND
    return "gloo" if configured == "auto" else configured


def megatron_parallel_sizes(parallel: ParallelConfig) -> dict:
    """The layout in megatron's own names, which initialize_model_parallel and TransformerConfig share."""
    return dict(tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
                virtual_pipeline_model_parallel_size=parallel.vpp, context_parallel_size=parallel.cp,
                expert_model_parallel_size=parallel.ep, expert_tensor_parallel_size=parallel.etp)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy, torch and megatron's RNG tracker (data-parallel, model-parallel and
    expert-parallel streams; each TP/EP rank gets its own stream as megatron intends)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def init_runtime(
    parallel: ParallelConfig | None = None, seed: int = 1234, timeout_minutes: int = 30
) -> RuntimeInfo:
    """Initialise torch.distributed and megatron's model-parallel groups. Idempotent per process."""
    from megatron.core import parallel_state as ps

    parallel = parallel or ParallelConfig()
    rank, world_size, local_rank = launch_env()
    device = pick_device(local_rank)
    if device.type == "cpu":
        cpu_compat.install()
        # reuse freed activation memory instead of re-faulting it in every step (see cpu_malloc)
        cpu_malloc.tune_glibc_malloc()
        # several ranks share a few cores: oversubscribed threads cost more than they give
        if "OMP_NUM_THREADS" not in os.environ and world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    else:
        cpu_compat.fix_missing_transformer_engine()
        torch.cuda.set_device(device)
    backend = default_backend(parallel.backend, device.type)

    if not dist.is_initialized():
        _master_address()
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if world_size % (parallel.tp * parallel.pp * parallel.cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tp*pp*cp="
            f"{parallel.tp * parallel.pp * parallel.cp}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(**megatron_parallel_sizes(parallel), distributed_timeout_minutes=timeout_minutes)
    seed_everything(seed)
    return RuntimeInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=backend,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )


def shutdown_runtime() -> None:
    """Tear down megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        collectives.barrier()
        dist.destroy_process_group()

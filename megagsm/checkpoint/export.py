"""A trainer's final export: its last checkpoint as a Hugging Face model directory, through the
converter (`megagsm.checkpoint.mcore_to_hf`, the engine of `python -m checkpoints_tools mcore-to-hf`)."""
from __future__ import annotations

from megagsm.checkpoint.mcore_to_hf import convert_mcore_to_hf
from megagsm.runtime.collectives import barrier
from megagsm.utils.logging import get_logger
from megagsm.utils.rank import is_rank0

log = get_logger(__name__)


def export_hf(checkpoint_path: str, out_dir: str) -> str:
    """Rank 0 converts the checkpoint (model tensors; optimizer and RNG entries are skipped), with the
    HF config and tokenizer kept in its hf/ subdirectory, into `out_dir` (config.json, *.safetensors,
    tokenizer files), atomically; the other ranks wait. Collective. Returns out_dir."""
    if is_rank0():
        summary = convert_mcore_to_hf(checkpoint_path, out_dir, overwrite=True, progress=False)
        log.info("exported HF model to %s (%d tensors, %.1f MB)", out_dir, summary["tensors"],
                 summary["bytes"] / 2**20)
    barrier()
    return out_dir

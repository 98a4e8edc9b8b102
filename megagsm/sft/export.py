"""Final export of a trained checkpoint to a Hugging Face model directory, through the converters
(`megagsm.checkpoint.mcore_to_hf`, branch `convert`; the same engine as `python -m checkpoints_tools
mcore-to-hf`). Without them the export is skipped with a log line."""
from __future__ import annotations

import json
import os

import torch.distributed as dist

from megagsm.utils.logging import get_logger

log = get_logger(__name__)


HF_SUBDIR = "hf"  # where a checkpoint keeps the HF config + tokenizer it follows (converters' layout)


def hf_side_files_writer(hf_config, tokenizer):
    """write_extra callback for save_checkpoint: <checkpoint>/hf/{config.json, tokenizer files}."""

    def write(checkpoint_dir: str) -> None:
        target = os.path.join(checkpoint_dir, HF_SUBDIR)
        os.makedirs(target, exist_ok=True)
        if isinstance(hf_config, dict):
            with open(os.path.join(target, "config.json"), "w", encoding="utf-8") as f:
                json.dump(hf_config, f, indent=2, sort_keys=True)
        else:
            hf_config.save_pretrained(target)
        tokenizer.save_pretrained(target)

    return write


def _converter():
    try:
        from megagsm.checkpoint.mcore_to_hf import convert_mcore_to_hf  # branch `convert`
    except ImportError:
        return None
    return convert_mcore_to_hf


def export_hf(checkpoint_path: str, out_dir: str) -> str | None:
    """Rank 0 converts the checkpoint (model tensors; optimizer and RNG entries are skipped) with the
    HF config and tokenizer kept in its hf/ subdirectory into `out_dir` (config.json, *.safetensors,
    tokenizer files), atomically; the other ranks wait. Returns out_dir, or None without converters."""
    convert = _converter()
    if convert is None:
        log.info("HF export skipped: the HF converters (megagsm.checkpoint, branch 'convert') are not "
                 "installed in this checkout; the megatron checkpoint is at %s", checkpoint_path)
        return None
    if not dist.is_initialized() or dist.get_rank() == 0:
        summary = convert(checkpoint_path, out_dir, overwrite=True, progress=False)
        log.info("exported HF model to %s (%d tensors, %.1f MB)", out_dir, summary["tensors"],
                 summary["bytes"] / 2**20)
    if dist.is_initialized():
        dist.barrier()
    return out_dir

"""Final export of a trained checkpoint to a Hugging Face model directory, through the converters
(`checkpoints_tools`, branch `convert`). Without them the export is skipped with a log line."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

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
        from checkpoints_tools import mcore_to_hf  # branch `convert`
    except ImportError:
        return None
    return mcore_to_hf


def export_hf(checkpoint_path: str, hf_config, tokenizer, out_dir: str) -> str | None:
    """Rank 0 writes `out_dir` (config.json, *.safetensors, tokenizer files) atomically; collective
    only through a final barrier. Returns out_dir, or None when the converters are missing."""
    converter = _converter()
    if converter is None:
        log.info("HF export skipped: the HF converters (checkpoints_tools, branch 'convert') are not "
                 "installed in this checkout; the megatron checkpoint is at %s", checkpoint_path)
        return None
    if not dist.is_initialized() or dist.get_rank() == 0:
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".hf-export-", dir=parent)
        try:
            converter.convert(checkpoint_path, tmp, hf_config=hf_config)
            tokenizer.save_pretrained(tmp)
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("exported HF model to %s", out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir

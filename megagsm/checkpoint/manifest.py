"""What makes a megatron checkpoint directory self-describing, for converters and trainers alike:

    <dir>/hf/config.json, tokenizer files, ...   the HF side files of the model it follows
    <dir>/megagsm_checkpoint.json                 the manifest: what wrote it (model_type, layout, vocab)

Trainer checkpoints (checkpoint.manager) and converter checkpoints (hf_to_mcore, save_mcore_checkpoint)
write both the same way, so `mcore-to-hf`, `verify` and `model.load` read either.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from megagsm.checkpoint.integrity import content_manifest
from megagsm.models.hf_config import HF_SUBDIR, MANIFEST

# weight files and indexes are never copied as "side files"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".distcp")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def copy_hf_side_files(src, dst) -> list[str]:
    """Copies the top-level non-weight files of an HF model dir (config.json, generation_config.json,
    tokenizer files, chat templates, ...) into dst; returns their names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.endswith(_WEIGHT_SUFFIXES) or p.name in _WEIGHT_INDEXES:
            continue
        if p.name.startswith("."):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def write_manifest(ckpt_dir, **fields) -> None:
    (Path(ckpt_dir) / MANIFEST).write_text(json.dumps({"format": "megagsm-mcore", "version": 1, **fields},
                                                      indent=2, sort_keys=True) + "\n")


def read_manifest(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def hf_side_files_writer(hf_config: dict, tokenizer, **manifest) -> Callable[[str], None]:
    """A checkpoint's side files from a live run: <dir>/hf/{config.json, tokenizer files} and the
    manifest (`manifest` fields plus the model_type)."""

    def write(checkpoint_dir: str) -> None:
        target = os.path.join(checkpoint_dir, HF_SUBDIR)
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        tokenizer.save_pretrained(target)
        write_manifest(checkpoint_dir, model_type=hf_config.get("model_type"), **manifest,
                       **content_manifest(checkpoint_dir, checksums=False))

    return write

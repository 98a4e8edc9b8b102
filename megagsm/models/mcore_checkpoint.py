"""Megatron (torch_dist) model checkpoints that describe themselves.

Directory layout written by megagsm (checkpoints_tools hf-to-mcore, or save_mcore_checkpoint):
    <dir>/.metadata, __*.distcp, metadata.json, common.pt   megatron dist_checkpointing (torch_dist)
    <dir>/hf/config.json, tokenizer files, ...               the HF side files of the source model
    <dir>/megagsm_checkpoint.json                            what wrote it (model_type, layout, vocab)
The tensors are layout-free: they load at any TP/PP/EP. Vocabulary tensors may be stored at the HF
vocab size or padded (megatron pads to a multiple of 128 * tp): loading reads the rows both sides
have and zeroes the model's padding rows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megagsm.models.errors import ModelInputError
from megagsm.models.hf_config import HF_SUBDIR, MANIFEST, hf_files_dir

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


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_sharded_state_dict(model_chunks) -> dict:
    return {f"chunk{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _drop_absent_extra_state(sharded: dict, stored_keys: set[str]) -> None:
    """Removes transformer-engine `_extra_state` objects the checkpoint does not hold (megagsm's
    converter writes weights only; the TE spec adds such objects the local spec lacks)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def walk(d):
        for k in list(d):
            v = d[k]
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, ShardedObject) and "_extra_state" in v.key:
                if not any(s == v.key or s.startswith(v.key + "/") for s in stored_keys):
                    del d[k]

    walk(sharded)


def _zero_vocab_padding(chunk, stored_rows: dict[str, int]) -> None:
    """Zeroes rows of vocab-parallel weights past what the checkpoint stored (megatron's padding)."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    targets = []
    if getattr(chunk, "pre_process", False) and "embedding.word_embeddings.weight" in stored_rows:
        targets.append((chunk.embedding.word_embeddings.weight, stored_rows["embedding.word_embeddings.weight"]))
    if getattr(chunk, "post_process", False) and chunk.output_layer.weight is not None:
        key = "output_layer.weight" if "output_layer.weight" in stored_rows else "embedding.word_embeddings.weight"
        if key in stored_rows:
            targets.append((chunk.output_layer.weight, stored_rows[key]))
    with torch.no_grad():
        for weight, rows in targets:
            local = weight.shape[0]
            first = tp_rank * local
            keep = max(0, min(local, rows - first))
            if keep < local:
                weight[keep:].zero_()


def load_mcore_checkpoint(model_chunks, ckpt_dir) -> None:
    """Loads a torch_dist model checkpoint (megagsm's or megatron's own model save) into this rank's
    model chunks, whatever layout it was written with. Collective over all ranks."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file() or not (ckpt_dir / ".metadata").is_file():
        raise ModelInputError(f"{ckpt_dir}: not a megatron torch_dist checkpoint (metadata.json/.metadata missing)")
    stored = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    sharded = _model_sharded_state_dict(model_chunks)
    _drop_absent_extra_state(sharded, set(stored))
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    stored_rows = {k: v.size[0] for k, v in stored.items()
                   if isinstance(v, TensorStorageMetadata) and k in ("embedding.word_embeddings.weight",
                                                                     "output_layer.weight")}
    for i, chunk in enumerate(model_chunks):
        module = _unwrap(chunk)
        result = module.load_state_dict(state[f"chunk{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"{ckpt_dir}: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        _zero_vocab_padding(module, stored_rows)


def save_mcore_checkpoint(model_chunks, out_dir, hf_files_from, overwrite: bool = False, **manifest) -> None:
    """Saves the model chunks as a self-describing torch_dist checkpoint: megatron's own
    dist_checkpointing.save into a temp dir, plus the HF side files from `hf_files_from` (an HF model
    dir or another megagsm checkpoint), renamed into place when every rank is done. Collective."""
    from megatron.core import dist_checkpointing

    from megagsm.utils.atomic import atomic_dir

    side_files = hf_files_dir(hf_files_from)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        dist_checkpointing.save(_model_sharded_state_dict(model_chunks), str(tmp))
        if not dist.is_initialized() or dist.get_rank() == 0:
            copy_hf_side_files(side_files, tmp / HF_SUBDIR)
            write_manifest(tmp, writer="save_mcore_checkpoint", **manifest)

"""Model weights in megatron torch_dist checkpoints: one loader for every checkpoint megagsm reads
(converter output, trainer checkpoints, LoRA-merged weights, megatron's own model saves).

The tensors are layout-free: they load at any TP/PP/EP. Vocabulary tensors may be stored at the HF
vocab size or padded (megatron pads to a multiple of 128 * tp): loading reads the rows both sides
have and zeroes the model's padding rows. transformer-engine `_extra_state` entries a checkpoint
lacks are tolerated (the local spec has none); any other missing or unexpected key is an error.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megagsm.checkpoint.integrity import content_manifest, verify_checkpoint_collective
from megagsm.checkpoint.manifest import copy_hf_side_files, write_manifest
from megagsm.checkpoint.safe_pickle import reraise_user_errors
from megagsm.models.errors import ModelInputError
from megagsm.models.gpt import unwrap_model
from megagsm.models.hf_config import HF_SUBDIR, hf_files_dir


def model_keys(model_chunks: list) -> list[str]:
    """The top-level keys of the chunks in a saved state dict (megatron-LM's own naming)."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def model_sharded_state_dict(model_chunks: list) -> dict:
    return {key: unwrap_model(c).sharded_state_dict() for key, c in zip(model_keys(model_chunks), model_chunks)}


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


def stored_metadata(ckpt_dir) -> dict:
    """{key: storage metadata} of a torch_dist checkpoint, refusing a directory that is not one."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file() or not (ckpt_dir / ".metadata").is_file():
        raise ModelInputError(f"{ckpt_dir}: not a megatron torch_dist checkpoint (metadata.json/.metadata missing)")
    return FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata


def load_model_state(model_chunks: list, loaded: dict, stored: dict, source) -> None:
    """Copies the loaded model entries (keys from model_keys) into the chunks; see the module doc."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored_rows = {k: v.size[0] for k, v in stored.items()
                   if isinstance(v, TensorStorageMetadata) and k in ("embedding.word_embeddings.weight",
                                                                     "output_layer.weight")}
    for key, chunk in zip(model_keys(model_chunks), model_chunks):
        module = unwrap_model(chunk)
        result = module.load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ModelInputError(f"{source}: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        _zero_vocab_padding(module, stored_rows)


def load_mcore_checkpoint(model_chunks, ckpt_dir) -> None:
    """Loads the model weights of a torch_dist checkpoint into this rank's chunks, whatever layout
    wrote it. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    verify_checkpoint_collective(ckpt_dir)  # whole and unaltered before any file of it is opened
    stored = stored_metadata(ckpt_dir)
    sharded = model_sharded_state_dict(model_chunks)
    _drop_absent_extra_state(sharded, set(stored))
    with reraise_user_errors():
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    load_model_state(model_chunks, loaded, stored, ckpt_dir)


def save_mcore_checkpoint(model_chunks, out_dir, hf_files_from, overwrite: bool = False, **manifest) -> None:
    """Saves the model chunks as a self-describing torch_dist checkpoint: megatron's own
    dist_checkpointing.save into a temp dir, plus the HF side files from `hf_files_from` (an HF model
    dir or another megagsm checkpoint), renamed into place when every rank is done. Collective."""
    from megatron.core import dist_checkpointing

    from megagsm.utils.atomic import atomic_dir

    side_files = hf_files_dir(hf_files_from)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        dist_checkpointing.save(model_sharded_state_dict(model_chunks), str(tmp))
        if not dist.is_initialized() or dist.get_rank() == 0:
            copy_hf_side_files(side_files, tmp / HF_SUBDIR)
            # a caller may name itself as the writer
            write_manifest(tmp, **{"writer": "save_mcore_checkpoint", **manifest}, **content_manifest(tmp))

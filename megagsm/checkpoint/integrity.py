"""What a checkpoint must contain, checked before anything is loaded from it.

`content_manifest(dir)` lists every file of a finished checkpoint (size and SHA-256) and every tensor
(name, global shape, dtype, bytes); the converter stores it in `megagsm_checkpoint.json`.
`verify_checkpoint(dir)` checks a checkpoint against it before loading: the files' sizes and
checksums (the `.metadata` pickle before it is ever opened), then, for any torch_dist checkpoint
with or without a manifest, that every `.distcp` file the metadata points at exists and is long
enough. Each failure is a UserError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from megagsm.errors import UserError
from megagsm.models.hf_config import MANIFEST

METADATA = ".metadata"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def read_dcp_metadata(ckpt_dir):
    """The torch_dist Metadata of `ckpt_dir`, through the allowlisted unpickler."""
    from megagsm.checkpoint import safe_pickle

    path = Path(ckpt_dir) / METADATA
    if not path.is_file():
        raise UserError(f"{path}: missing (not a torch_dist checkpoint)")
    with open(path, "rb") as f:
        return safe_pickle.load_metadata_pickle(f, path)


def tensor_table(metadata) -> dict:
    """{name: {"shape", "dtype", "bytes"}} of the checkpoint's tensors."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for name, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            dtype = md.properties.dtype
            out[name] = {"shape": list(md.size), "dtype": str(dtype).removeprefix("torch."),
                         "bytes": math.prod(md.size) * dtype.itemsize}
    return out


def content_manifest(ckpt_dir, checksums: bool = True) -> dict:
    """Manifest fields for a complete checkpoint directory: files (bytes, and sha256 with `checksums`:
    trainer checkpoints skip it, hashing a large model's shards at every save costs minutes) and tensors."""
    ckpt_dir = Path(ckpt_dir)
    files = {str(p.relative_to(ckpt_dir)): {"bytes": p.stat().st_size, **({"sha256": _sha256(p)} if checksums else {})}
             for p in _files(ckpt_dir)}
    return {"files": files, "tensors": tensor_table(read_dcp_metadata(ckpt_dir))}


def _check_manifest_files(ckpt_dir: Path, recorded: dict, checksums: bool) -> None:
    manifest = ckpt_dir / MANIFEST
    # .metadata first: its checksum is checked before the pickle is opened
    for rel in sorted(recorded, key=lambda r: (r != METADATA, r)):
        want, path = recorded[rel], ckpt_dir / rel
        if not path.is_file():
            raise UserError(f"{path}: missing (listed in {manifest})")
        size = path.stat().st_size
        if size != want["bytes"]:
            state = "truncated" if size < want["bytes"] else "longer than recorded"
            raise UserError(f"{path}: {state}: {size} bytes, {manifest} records {want['bytes']}")
        if checksums and "sha256" in want and _sha256(path) != want["sha256"]:
            raise UserError(f"{path}: SHA-256 differs from the one {manifest} records (file changed or corrupt)")


def check_shards(ckpt_dir, metadata) -> None:
    """Every stored item's file exists and holds its byte range (works without a manifest)."""
    ckpt_dir = Path(ckpt_dir)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        path = ckpt_dir / rel
        if not path.is_file():
            raise UserError(f"{path}: missing shard (named in {ckpt_dir / METADATA})")
        size = path.stat().st_size
        if size < end:
            raise UserError(f"{path}: truncated shard: {size} bytes, {ckpt_dir / METADATA} needs {end}")


def verify_checkpoint(ckpt_dir, checksums: bool = True) -> None:
    """Raises UserError naming the first missing, truncated or altered file of `ckpt_dir`."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / MANIFEST
    manifest = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{manifest_path}: not valid JSON ({e})") from None
    if isinstance(manifest.get("files"), dict):
        _check_manifest_files(ckpt_dir, manifest["files"], checksums)
    metadata = read_dcp_metadata(ckpt_dir)
    check_shards(ckpt_dir, metadata)
    if isinstance(manifest.get("tensors"), dict):
        stored = tensor_table(metadata)
        for name, want in sorted(manifest["tensors"].items()):
            have = stored.get(name)
            if have is None or have["shape"] != want.get("shape") or have["dtype"] != want.get("dtype"):
                raise UserError(f"{ckpt_dir / METADATA}: tensor {name} is {have} but {manifest_path} "
                                f"records {want}")


def verify_checkpoint_collective(ckpt_dir, checksums: bool = True) -> None:
    """verify_checkpoint on the first rank only (one read of the files), the verdict shared: every
    rank raises the same UserError. Without a process group it is verify_checkpoint."""
    from megagsm.runtime.collectives import broadcast_object, group_size
    from megagsm.utils.rank import is_rank0

    if group_size() == 1:
        verify_checkpoint(ckpt_dir, checksums)
        return
    problem = None
    if is_rank0():
        try:
            verify_checkpoint(ckpt_dir, checksums)
        except UserError as e:
            problem = str(e)
    problem = broadcast_object(problem, src=0)
    if problem is not None:
        raise UserError(problem)

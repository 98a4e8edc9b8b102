"""Loading a checkpoint never runs code from it.

A torch_dist checkpoint carries three kinds of pickles:
  * `.metadata`: torch's FileSystemReader.read_metadata() calls plain `pickle.load` on it, so a
    crafted file runs whatever it names (os.system, ...) as soon as any reader opens the checkpoint;
  * the byte objects inside `__*.distcp` files (megatron's ShardedObjects: RNG states, optimizer
    param groups, TE `_extra_state`): DefaultLoadPlanner.load_bytes calls `torch.load(weights_only=False)`;
  * `common.pt`: megatron's TorchCommonLoadStrategy calls `torch.load` without `weights_only`,
    which is safe only while torch's default (weights_only=True since torch 2.6) is not overridden
    by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
`install()` routes all three through restricted unpicklers: `.metadata` through `MetadataUnpickler`
(an allowlist of the checkpoint metadata classes torch and megatron write), the other two through
`torch.load(weights_only=True)` (tensors, containers and megatron's registered safe globals). A file
naming anything else is refused with a UserError that names the file. Importing megagsm.checkpoint
calls install(); it is idempotent.
"""
from __future__ import annotations

import io
import pickle
from contextlib import contextmanager
from pathlib import Path

from megagsm.errors import UserError

# module -> names the metadata pickle may construct. Everything else is refused.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType",
    },
    "torch.serialization": {"_get_layout"},  # layout by name (torch.strided, ...)
    "torch": {"Size"},                        # plus any torch.<dtype> / layout / memory_format value
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "builtins": {"set", "frozenset", "dict", "list", "tuple", "slice", "complex", "bytearray", "bytes"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(UserError):
    """A checkpoint file asked the unpickler for something that is not checkpoint data."""


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that constructs only the allowlisted checkpoint metadata classes."""

    def find_class(self, module: str, name: str):
        import torch

        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def load_metadata_pickle(stream, path) -> object:
    """Unpickles a DCP `.metadata` stream with MetadataUnpickler; UserError naming `path` on refusal."""
    try:
        return MetadataUnpickler(stream).load()
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: {e}: not torch_dist checkpoint metadata; refusing to load this checkpoint "
            "(it may be crafted to run code)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise UserError(f"{path}: unreadable torch_dist metadata ({type(e).__name__}: {e})") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _weights_only_load(source, path):
    """torch.load(weights_only=True), a refusal turned into a UserError naming `path`."""
    import torch

    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path}: refused to unpickle ({_first_line(e)}); refusing to load "
                                    "this checkpoint (it may be crafted to run code)") from None


@contextmanager
def reraise_user_errors():
    """torch.distributed.checkpoint wraps what a reader or planner raised (on any rank) in a
    CheckpointException (a BaseException with a traceback per rank): a refused pickle or another
    UserError inside it comes out again as that one-line UserError."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        for failure in e.failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, UserError):
                raise type(cause)(str(cause)) from None
        raise


_INSTALLED = False


def install() -> None:
    """Patches torch's FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes and megatron's
    TorchCommonLoadStrategy.load_common (once; later calls do nothing)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = load_metadata_pickle(stream, path)
        except FileNotFoundError:
            raise UserError(f"{path}: missing (not a torch_dist checkpoint)") from None
        if not hasattr(metadata, "state_dict_metadata"):
            raise UserError(f"{path}: holds a {type(metadata).__name__}, not torch_dist checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        metadata.megagsm_checkpoint_dir = str(Path(path).parent)  # for load_bytes' error messages
        return metadata

    def load_bytes(self, read_item, value):
        metadata = getattr(self, "metadata", None)
        where = read_item.dest_index.fqn
        info = (getattr(metadata, "storage_data", None) or {}).get(read_item.storage_index)
        if info is not None:
            where = f"{Path(getattr(metadata, 'megagsm_checkpoint_dir', '.')) / info.relative_path} ({where})"
        obj = _weights_only_load(value if isinstance(value, io.IOBase) else io.BytesIO(value), where)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    FileSystemReader.read_metadata = read_metadata
    DefaultLoadPlanner.load_bytes = load_bytes
    _install_megatron_common()
    _INSTALLED = True


def _install_megatron_common() -> None:
    try:
        from megatron.core.dist_checkpointing.strategies.common import (
            COMMON_STATE_FNAME,
            TorchCommonLoadStrategy,
        )
    except ImportError:  # megatron absent: nothing of it to guard
        return
    original = TorchCommonLoadStrategy.load_common

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            return original(self, checkpoint_dir)  # megatron's own "does not exist" error
        return _weights_only_load(str(path), path)

    TorchCommonLoadStrategy.load_common = load_common

"""torch_dist (torch.distributed.checkpoint) checkpoints, written and read a tensor at a time.

Writing: `save_lazy` takes a list of chunk descriptions (key, global shape, offsets, sizes, dtype and
a function producing the data) and runs a normal DCP save whose planner asks for each chunk's data
only when the writer reaches it; one file per chunk, so the writer never holds more than one chunk.
The result is exactly what megatron's `dist_checkpointing.save` writes for a model (tensor keys,
global shapes with the layer axis prepended, `metadata.json`, `common.pt`), so megatron's
`dist_checkpointing.load` reads it at any TP/PP/EP layout. TE `_extra_state` objects are not
written: megagsm's loader skips them when absent.

Reading: `DcpReader.read(key, offsets, sizes)` reads one region of a global tensor, whatever
chunking the writer used (megatron's own saves included), through DCP's reader and resharding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megagsm.checkpoint.integrity import check_shards
from megagsm.models.errors import ModelInputError


@dataclass
class Chunk:
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]   # returns a tensor of shape `sizes` (or its squeeze)

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.dtype.itemsize


class _LazySavePlanner(DefaultSavePlanner):
    def __init__(self, chunks: list[Chunk], on_chunk: Callable[[Chunk], None] | None = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        if len(self.chunks) != len(chunks):
            raise ValueError("two chunks share a key and offsets")
        self.on_chunk = on_chunk

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self.chunks.values()
        ]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        chunk = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        data = chunk.produce()
        if data.numel() != math.prod(chunk.sizes) or data.dtype != chunk.dtype:
            raise RuntimeError(f"{chunk.key}{list(chunk.offsets)}: produced {tuple(data.shape)} "
                               f"{data.dtype}, planned {chunk.sizes} {chunk.dtype}")
        if self.on_chunk is not None:
            self.on_chunk(chunk)
        return data.reshape(chunk.sizes).contiguous()


def save_lazy(chunks: list[Chunk], directory, on_chunk=None) -> None:
    """Collective over the default process group when it is initialised (every rank passes the
    chunks it owns; together they must cover every tensor). Writes megatron's metadata too."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    from megagsm.checkpoint.safe_pickle import reraise_user_errors

    directory = Path(directory)
    distributed = dist.is_available() and dist.is_initialized()
    with reraise_user_errors():  # e.g. a NaN weight found by a chunk's producer
        dcp.save(
            {},
            storage_writer=FileSystemWriter(str(directory), single_file_per_rank=False, sync_files=False,
                                            thread_count=1),
            planner=_LazySavePlanner(chunks, on_chunk),
            no_dist=not distributed,
        )
    if not distributed or dist.get_rank() == 0:
        save_config(CheckpointingConfig("torch_dist", 1), str(directory))
        torch.save({}, directory / "common.pt")  # megatron's common (non-sharded) state: none


class _IntoTensor(LoadPlanner):
    """Reads checkpoint regions into views of one destination tensor."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self):
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise RuntimeError("tensor reads only")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self.out
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class DcpReader:
    """Random access to the tensors of a torch_dist checkpoint directory, in one process."""

    def __init__(self, directory):
        self.dir = Path(directory)
        if not (self.dir / ".metadata").is_file():
            raise ModelInputError(f"{self.dir}: not a torch_dist checkpoint (no .metadata file)")
        self.reader = FileSystemReader(str(self.dir))
        self.metadata = self.reader.read_metadata()  # allowlisted unpickler (megagsm.checkpoint.safe_pickle)
        check_shards(self.dir, self.metadata)
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def tensors(self) -> dict[str, TensorStorageMetadata]:
        return {k: v for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)}

    def _chunk_file(self, key: str, chunk) -> torch.Tensor | None:
        """A stored chunk that has a file of its own (as megagsm's writer stores them), memory-mapped:
        no read and no anonymous copy. None for chunks packed into shared files."""
        info = getattr(self.reader, "storage_data", {}).get(MetadataIndex(key, chunk.offsets))
        if info is None or getattr(info, "transform_descriptors", None) or info.offset != 0:
            return None
        path = self.dir / info.relative_path
        if path.stat().st_size != info.length:
            return None
        tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return tensor.reshape(tuple(chunk.sizes)) if tensor.numel() == math.prod(chunk.sizes) else None

    def _from_chunk_files(self, key: str, md: TensorStorageMetadata, offsets, sizes) -> torch.Tensor | None:
        """The region assembled from memory-mapped chunk files; returned without a copy when it is
        exactly one chunk. None when some chunk it needs is not in a file of its own."""
        lo, hi = list(offsets), [o + n for o, n in zip(offsets, sizes)]
        parts = []
        for chunk in md.chunks:
            c_lo, c_hi = list(chunk.offsets), [o + n for o, n in zip(chunk.offsets, chunk.sizes)]
            a = [max(x, y) for x, y in zip(lo, c_lo)]
            b = [min(x, y) for x, y in zip(hi, c_hi)]
            if all(x < y for x, y in zip(a, b)):
                parts.append((chunk, a, b))
        if sum(math.prod(y - x for x, y in zip(a, b)) for _, a, b in parts) != math.prod(sizes):
            return None
        if len(parts) == 1 and list(parts[0][0].offsets) == lo and list(parts[0][0].sizes) == list(sizes):
            return self._chunk_file(key, parts[0][0])
        out = None
        for chunk, a, b in parts:
            data = self._chunk_file(key, chunk)
            if data is None:
                return None
            if out is None:
                out = torch.empty(tuple(sizes), dtype=data.dtype)
            src = data[tuple(slice(x - c, y - c) for x, y, c in zip(a, b, chunk.offsets))]
            out[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo))] = src
        return out

    def read(self, key: str, offsets, sizes, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of global tensor `key`; every element must be stored."""
        md = self.tensors().get(key)
        if md is None:
            raise ModelInputError(f"{self.dir}: tensor {key} missing from the checkpoint")
        fast = self._from_chunk_files(key, md, offsets, sizes)
        if fast is not None:
            return fast if dtype is None else fast.to(dtype)
        out = torch.empty(tuple(sizes), dtype=md.properties.dtype)
        want = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [want])
        if sum(math.prod(i.lengths) for i in items) != out.numel():
            raise ModelInputError(f"{self.dir}: tensor {key} has no stored data for region "
                                  f"offsets={list(offsets)} sizes={list(sizes)}")
        planner = _IntoTensor(out)
        plan = self.reader.prepare_local_plan(LoadPlan(items))
        plan = self.reader.prepare_global_plan([plan])[0]
        self.reader.read_data(plan, planner).wait()
        return out if dtype is None else out.to(dtype)

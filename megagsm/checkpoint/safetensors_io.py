"""Safetensors, one tensor at a time.

Reading: headers are parsed directly (no data touched); tensors, or row/column ranges of them, are
read with `safetensors.safe_open`, opened per read so the file mapping is released at once and the
process never holds more than the tensors it asked for.
Writing: `ShardedSafetensorsWriter` knows every tensor's name, shape and dtype up front, so it writes
each shard's header first and then streams tensors into it as they are produced; a shard is never
assembled in memory. Output follows transformers' layout (model.safetensors, or
model-0000i-of-0000n.safetensors plus model.safetensors.index.json).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from megagsm.models.errors import ModelInputError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


def read_header(path: Path) -> dict:
    """The tensor entries of a safetensors header; the file must hold every byte they point at."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelInputError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ModelInputError(f"{path}: not a readable safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    try:
        end = 8 + n + max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ModelInputError(f"{path}: not a readable safetensors file (a header entry has no "
                              "data_offsets)") from None
    if size < end:
        raise ModelInputError(f"{path}: truncated: {size} bytes, its header needs {end}")
    return header


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class SafetensorsDir:
    """The tensors of an HF model directory (index-sharded or single-file), by name."""

    def __init__(self, directory):
        self.dir = Path(directory)
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise ModelInputError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = (f" (found {bins[0]}: re-save it with transformers save_pretrained, which writes "
                    "safetensors)" if bins else "")
            raise ModelInputError(f"{self.dir}: no *.safetensors weight files{hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise ModelInputError(f"{path}: missing (listed in {INDEX_NAME})")
            for key, entry in read_header(path).items():
                if weight_map is not None and weight_map.get(key) != name:
                    continue  # a stale copy the index does not point at
                if entry["dtype"] not in DTYPES:
                    raise ModelInputError(f"{path}: tensor {key} has unsupported dtype {entry['dtype']}")
                self.tensors[key] = TensorInfo(path, tuple(entry["shape"]), DTYPES[entry["dtype"]])
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self.tensors))
            if lost:
                raise ModelInputError(f"{index}: tensor {lost[0]} is listed but not in {weight_map[lost[0]]}")

    def names(self) -> set[str]:
        return set(self.tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ModelInputError(f"{self.dir}: tensor {name} missing from the safetensors files")
        return self.tensors[name]

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        """The tensor, or rows [a, b) (and columns [c, d) of a matrix) of it."""
        info = self.info(name)
        with safe_open(str(info.file), framework="pt") as f:
            if rows is None and cols is None:
                return f.get_tensor(name)
            part = f.get_slice(name)
            r = slice(*(rows or (0, info.shape[0])))
            return part[r] if cols is None else part[r, slice(*cols)]


class ShardedSafetensorsWriter:
    """Streams tensors into safetensors shards planned from (name, shape, dtype) entries; tensors
    must then be written in exactly that order."""

    def __init__(self, out_dir, entries: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int):
        self.dir = Path(out_dir)
        self.entries = entries
        shards: list[list[int]] = [[]]
        size = 0
        for i, (_, shape, dtype) in enumerate(entries):
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self.shard_of = {i: s for s, members in enumerate(shards) for i in members}
        self.shards = shards
        self.next = 0
        self.handle = None
        self.total_bytes = sum(math.prod(s) * d.itemsize for _, s, d in entries)

    def _open(self, shard: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in self.shards[shard]:
            name, shape, dtype = self.entries[i]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.handle = open(self.dir / self.files[shard], "wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i = self.next
        want_name, shape, dtype = self.entries[i]
        if name != want_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {want_name} {shape} {dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        shard = self.shard_of[i]
        if self.handle is None:
            self._open(shard)
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            self.handle.write(data.view(torch.uint8).numpy().data)
        self.next += 1
        if self.next == len(self.entries) or self.shard_of[self.next] != shard:
            self.handle.close()
            self.handle = None

    def finish(self) -> list[str]:
        if self.next != len(self.entries):
            raise RuntimeError(f"only {self.next} of {len(self.entries)} tensors were written")
        if len(self.files) > 1:
            weight_map = {self.entries[i][0]: self.files[s] for s, m in enumerate(self.shards) for i in m}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return self.files

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

"""Raw rows from a data source, each with where it came from, and one-line errors for bad files.

Sources, picked from the argument:

- a ``.jsonl`` / ``.json`` file (one JSON object per line, or one JSON array in a ``.json`` file),
- a ``.parquet`` file (read with pyarrow),
- a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
- any other directory, or a hub name such as ``openai/gsm8k``: ``datasets.load_dataset(..., split=...)``.

File-level problems (missing file, unreadable parquet, a ``data.source`` that does not match the file,
an unknown split) raise :class:`DataFileError`, a :class:`~megagsm.errors.UserError` with one line naming
the file. Row-level problems (a line that is not JSON, a line that is not UTF-8) come back as rows with
an ``error`` so the caller can skip them or report them by file and row.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from megagsm.errors import UserError

SourceKind = Literal["jsonl", "parquet", "hf"]

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# Hub datasets whose configuration must be named; openai/gsm8k has "main" and "socratic".
_DEFAULT_HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}
# Suffixes that mark a missing argument as a file path rather than a hub name ("org/name.v2" stays a name).
_FILE_LIKE_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES + (".csv", ".tsv", ".txt", ".arrow", ".gz")


class DataFileError(UserError):
    """A data file or source that cannot be read as a whole; the message names it."""


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """The data path does not exist (also a FileNotFoundError, for callers that catch that)."""


@dataclass(frozen=True)
class RawRow:
    index: int                 # 0-based among the source's rows (jsonl: among its non-blank lines)
    value: Any                 # the parsed row, or the line's text when it could not be parsed
    error: str = ""            # why the row could not be read ("" when it was)
    line: int | None = None    # 1-based line number in a text file

    def where(self) -> str:
        return f"row {self.index}" + (f": line {self.line}" if self.line is not None else "")


@dataclass
class OpenedSource:
    name: str                  # the file (and split) as shown in messages
    rows: Iterator[RawRow]
    columns: list[str] | None  # known up front for parquet and datasets sources; None for jsonl


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _undecodable(raw: bytes, error: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"


def _iter_json_lines(path: Path, data: bytes) -> Iterator[RawRow]:
    index = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawRow(index, raw.decode("utf-8", errors="replace"), _undecodable(raw, e), number)
            index += 1
            continue
        if not text.strip():
            continue
        try:
            yield RawRow(index, json.loads(text), "", number)
        except json.JSONDecodeError as e:
            yield RawRow(index, text, f"invalid JSON ({e.msg} at column {e.colno})", number)
        index += 1


def _iter_json_array(path: Path, data: bytes) -> Iterator[RawRow]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataFileError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                            "re-encode the file as UTF-8") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(rows, list):
        raise DataFileError(f"{path}: a .json file must hold an array of rows or one JSON object per line")
    for i, row in enumerate(rows):
        yield RawRow(i, row)


def _open_json(path: Path) -> OpenedSource:
    data = path.read_bytes()
    if path.suffix.lower() == ".json" and data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return OpenedSource(str(path), _iter_json_array(path, data), None)
    return OpenedSource(str(path), _iter_json_lines(path, data), None)


def _open_parquet(path: Path) -> OpenedSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataFileError(f"{path}: not a readable parquet file ({one_line(e)})") from None

    def rows() -> Iterator[RawRow]:
        index = 0
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                yield RawRow(index, row)
                index += 1

    return OpenedSource(str(path), rows(), list(table.column_names))


def _open_dataset(ds: Any, name: str) -> OpenedSource:
    return OpenedSource(name, (RawRow(i, row) for i, row in enumerate(ds)), list(ds.column_names))


def looks_like_local_path(source: str) -> bool:
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES
        or source.count("/") > 1
    )


def _check_kind(kind: SourceKind | None, path: Path, suffix: str, field: str) -> None:
    found = "jsonl" if suffix in JSON_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else None
    if kind in ("jsonl", "parquet") and found is not None and found != kind:
        raise DataFileError(f"data.source={kind} but {field}={path} is a {suffix} file; "
                            f"set data.source={found} (or point {field} at a {kind} file)")


def open_source(
    source: str | os.PathLike,
    split: str = "train",
    *,
    kind: SourceKind | None = None,
    config_name: str | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    field: str = "data path",
) -> OpenedSource:
    """The rows of one source. ``kind`` (``data.source``) refuses a file of the other format;
    ``field`` names the config field the path came from, for messages."""
    source_str = os.fspath(source)
    path = Path(source_str).expanduser()
    kwargs = dict(dataset_kwargs or {})
    if path.is_file():
        suffix = path.suffix.lower()
        _check_kind(kind, path, suffix, field)
        try:
            if suffix in JSON_SUFFIXES:
                return _open_json(path)
            if suffix in PARQUET_SUFFIXES:
                return _open_parquet(path)
        except PermissionError as e:
            raise DataFileError(f"{path}: cannot read the file ({one_line(e)})") from None
        raise DataFileError(
            f"{path}: unknown file extension {path.suffix!r}; expected one of "
            f"{', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)} or a datasets directory/name"
        )
    if path.is_dir():
        return _open_directory(path, split, config_name, kwargs)
    if looks_like_local_path(source_str) or kind in ("jsonl", "parquet"):
        raise DataFileNotFoundError(f"{field}: data file not found: {source_str}")
    return _open_hub(source_str, split, config_name, kwargs, field)


def _open_directory(path: Path, split: str, config_name: str | None, kwargs: dict) -> OpenedSource:
    import datasets

    name = f"{path} [{split}]"
    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataFileError(f"{path}: split {split!r} not found; available: {sorted(loaded)}")
                loaded = loaded[split]
            return _open_dataset(loaded, name)
        return _open_dataset(datasets.load_dataset(str(path), config_name, split=split, **kwargs), name)
    except (FileNotFoundError, ValueError, KeyError) as e:  # datasets' own "no data files", "unknown split"
        if isinstance(e, UserError):
            raise
        raise DataFileError(f"{path}: cannot load split {split!r} with datasets ({one_line(e)})") from None


def _open_hub(name: str, split: str, config_name: str | None, kwargs: dict, field: str) -> OpenedSource:
    # Not on disk and shaped like a hub name: let datasets resolve it (its own cache, or the hub).
    import datasets

    config = config_name if config_name is not None else _DEFAULT_HUB_CONFIGS.get(name)
    try:
        ds = datasets.load_dataset(name, config, split=split, **kwargs)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise DataFileNotFoundError(f"{field}: {name!r} is neither a local path nor a loadable datasets "
                                    f"name ({one_line(e)})") from None
    return _open_dataset(ds, f"{name} [{split}]")

"""Load GSM8K-format rows (``question``, ``answer`` ending in ``#### N``).

Sources, picked from the argument:

- a ``.jsonl`` / ``.json`` file (one JSON object per line; the openai/gsm8k release format),
- a ``.parquet`` file (the Hugging Face hub layout, read with pyarrow),
- a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
- any other directory, or a hub name such as ``openai/gsm8k``: ``datasets.load_dataset(..., split=...)``.

Rows whose fields are missing or malformed are collected in a :class:`BadRowReport` (count plus the first
three examples with file and row index) and then either skipped with a logged warning or raised as
:class:`BadRowError`, as chosen by ``on_bad_row``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from megagsm.errors import UserError

logger = logging.getLogger(__name__)

OnBadRow = Literal["skip", "error"]

# "#### 72", "#### -3", "#### 1,234", "#### $5", "#### 2.5": the GSM8K final-answer line.
_FINAL_ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
# Calculator annotations in GSM8K worked solutions: "<<48/2=24>>".
_CALC_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")

_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
# Hub datasets whose configuration must be named; openai/gsm8k has "main" and "socratic".
_DEFAULT_HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}


@dataclass(frozen=True)
class GSM8KExample:
    question: str
    answer: str  # the full worked solution, ending in "#### N"
    final_answer: str  # N, normalised by extract_final_answer (no commas, no "$")


@dataclass
class BadRowReport:
    source: str
    count: int = 0
    examples: list[str] = field(default_factory=list)  # the first three, each naming file and row index
    max_examples: int = 3

    def add(self, row_index: int, reason: str, row: Any) -> None:
        self.count += 1
        if len(self.examples) < self.max_examples:
            shown = repr(row)
            if len(shown) > 200:
                shown = shown[:200] + "..."
            self.examples.append(f"{self.source} row {row_index}: {reason}: {shown}")

    def summary(self) -> str:
        lines = [f"{self.count} bad row(s) in {self.source}; first {len(self.examples)}:"]
        lines += [f"  {e}" for e in self.examples]
        return "\n".join(lines)


class BadRowError(UserError):
    def __init__(self, report: BadRowReport):
        super().__init__(report.summary())
        self.report = report


def extract_final_answer(answer: str) -> str | None:
    """The number after the last ``####`` in a GSM8K answer, without commas or ``$``; None if absent."""
    if not isinstance(answer, str):
        return None
    matches = _FINAL_ANSWER_RE.findall(answer)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def strip_calculator_annotations(answer: str) -> str:
    """Remove GSM8K's ``<<a*b=c>>`` calculator annotations from a worked solution."""
    return _CALC_ANNOTATION_RE.sub("", answer)


def _validate_row(row: Any) -> tuple[GSM8KExample | None, str]:
    if not isinstance(row, dict):
        return None, f"row is a {type(row).__name__}, not an object"
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        return None, "missing or empty 'question'"
    if not isinstance(answer, str) or not answer.strip():
        return None, "missing or empty 'answer'"
    final = extract_final_answer(answer)
    if final is None:
        return None, "'answer' has no '#### <number>' final answer"
    return GSM8KExample(question=question, answer=answer, final_answer=final), ""


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str]]:
    """Yield (row_index, row, parse_error) for each non-blank line; row_index counts from 0."""
    with path.open("r", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    # A .json file may hold one JSON array of rows instead of JSON lines.
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        for i, row in enumerate(rows):
            yield i, row, ""
        return
    index = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            yield index, json.loads(line), ""
        except json.JSONDecodeError as e:
            yield index, line, f"invalid JSON ({e.msg})"
        index += 1


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any, str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        yield i, row, ""


def _iter_hf_dataset(ds: Any) -> Iterator[tuple[int, Any, str]]:
    for i, row in enumerate(ds):
        yield i, row, ""


# Suffixes that mark a missing argument as a file path rather than a hub name ("org/name.v2" stays a name).
_FILE_LIKE_SUFFIXES = _JSON_SUFFIXES + _PARQUET_SUFFIXES + (".csv", ".tsv", ".txt", ".arrow", ".gz")


def _looks_like_local_path(source: str) -> bool:
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES
        or source.count("/") > 1
    )


def _open_source(
    source: str | os.PathLike, split: str, config_name: str | None, dataset_kwargs: dict[str, Any]
) -> tuple[str, Iterable[tuple[int, Any, str]]]:
    source_str = os.fspath(source)
    path = Path(source_str).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in _JSON_SUFFIXES:
            return str(path), _iter_jsonl(path)
        if suffix in _PARQUET_SUFFIXES:
            return str(path), _iter_parquet(path)
        raise ValueError(
            f"{path}: unknown file extension {path.suffix!r}; expected one of "
            f"{', '.join(_JSON_SUFFIXES + _PARQUET_SUFFIXES)} or a datasets directory/name"
        )
    if path.is_dir():
        import datasets

        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{path}: split {split!r} not found; available: {sorted(loaded)}")
                loaded = loaded[split]
            return f"{path} [{split}]", _iter_hf_dataset(loaded)
        ds = datasets.load_dataset(str(path), config_name, split=split, **dataset_kwargs)
        return f"{path} [{split}]", _iter_hf_dataset(ds)
    if _looks_like_local_path(source_str):
        raise FileNotFoundError(f"GSM8K source not found: {source_str}")
    # Not on disk and shaped like a hub name: let datasets resolve it (its own cache, or the hub).
    import datasets

    config = config_name if config_name is not None else _DEFAULT_HUB_CONFIGS.get(source_str)
    try:
        ds = datasets.load_dataset(source_str, config, split=split, **dataset_kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"GSM8K source {source_str!r} is neither a local path nor a loadable dataset: {e}") from e
    return f"{source_str} [{split}]", _iter_hf_dataset(ds)


def load_gsm8k_with_report(
    source: str | os.PathLike,
    split: str = "train",
    *,
    on_bad_row: OnBadRow = "skip",
    config_name: str | None = None,
    limit: int | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
) -> tuple[list[GSM8KExample], BadRowReport]:
    """Load rows and return them with the report of the bad ones (see :func:`load_gsm8k`)."""
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    name, rows = _open_source(source, split, config_name, dict(dataset_kwargs or {}))
    report = BadRowReport(source=name)
    examples: list[GSM8KExample] = []
    for index, row, parse_error in rows:
        if limit is not None and len(examples) >= limit:
            break
        example, reason = (None, parse_error) if parse_error else _validate_row(row)
        if example is None:
            report.add(index, reason, row)
            continue
        examples.append(example)
    if report.count:
        if on_bad_row == "error":
            raise BadRowError(report)
        logger.warning("skipped %s", report.summary())
    return examples, report


def load_gsm8k(
    source: str | os.PathLike,
    split: str = "train",
    *,
    on_bad_row: OnBadRow = "skip",
    config_name: str | None = None,
    limit: int | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
) -> list[GSM8KExample]:
    """Load GSM8K rows from a jsonl/parquet file, a ``save_to_disk`` directory, or a datasets name/path.

    ``split`` selects the split for datasets sources (ignored for single files). ``config_name`` is
    passed to ``datasets.load_dataset`` (``openai/gsm8k`` defaults to ``"main"``), and so are
    ``dataset_kwargs`` (e.g. ``cache_dir``). ``limit`` keeps the
    first ``limit`` good rows. Bad rows are skipped with a warning, or raise :class:`BadRowError` when
    ``on_bad_row="error"``.
    """
    examples, _ = load_gsm8k_with_report(
        source, split, on_bad_row=on_bad_row, config_name=config_name, limit=limit, dataset_kwargs=dataset_kwargs
    )
    return examples

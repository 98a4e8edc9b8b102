"""Load GSM8K-style examples from jsonl/parquet files, ``datasets`` directories or hub names.

Where rows come from and how bad files are reported: :mod:`megagsm.data.sources`. Which columns hold
the prompt, the response and the ground truth (openai/gsm8k, verl's RL layout, dotted paths, chat
messages): :mod:`megagsm.data.layouts`.

Rows whose fields are missing or malformed are collected in a :class:`BadRowReport` (count plus the
first three, each with file and row) and then either skipped with a logged warning or raised as one
:class:`BadRowError` line, as ``on_bad_row`` says. A source that yields no example at all is an error
("no examples in FILE") either way.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from megagsm.data.layouts import DEFAULT_DATA_SOURCE, RowKeys, check_columns, row_parts
from megagsm.data.sources import (  # noqa: F401  (re-exported: older callers import them from here)
    DataFileError,
    DataFileNotFoundError,
    SourceKind,
    looks_like_local_path as _looks_like_local_path,
    open_source,
)
from megagsm.errors import UserError

logger = logging.getLogger(__name__)

OnBadRow = Literal["skip", "error"]

# "#### 72", "#### -3", "#### 1,234", "#### $5", "#### 2.5": the GSM8K final-answer line.
_FINAL_ANSWER_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
# Calculator annotations in GSM8K worked solutions: "<<48/2=24>>".
_CALC_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class GSM8KExample:
    """One problem. ``question`` is the problem text; ``answer`` the response SFT trains on (the worked
    solution; "" for rows that have none, e.g. DAPO-Math); ``final_answer`` the ground truth rewards
    compare with. ``messages`` is the chat prompt when the row has one (verl's ``prompt`` column): it is
    what the model sees, rendered with the tokenizer's chat template (see
    :func:`megagsm.data.prompts.encode_example_prompt`), and it already holds any instruction, so the
    prompt template is not applied to it. ``conversation`` is a whole multi-turn SFT row
    (``data.messages_key``), assistant turns included."""

    question: str
    answer: str
    final_answer: str
    data_source: str = DEFAULT_DATA_SOURCE
    messages: tuple[dict, ...] | None = None
    conversation: tuple[dict, ...] | None = None

    @property
    def ground_truth(self) -> str:
        return self.final_answer


@dataclass
class BadRowReport:
    source: str
    count: int = 0
    examples: list[str] = field(default_factory=list)  # the first three, each naming file and row
    max_examples: int = 3

    def add(self, where: str | int, reason: str, row: Any) -> None:
        self.count += 1
        if len(self.examples) < self.max_examples:
            shown = repr(row)
            if len(shown) > 120:
                shown = shown[:120] + "..."
            where = f"row {where}" if isinstance(where, int) else where
            self.examples.append(f"{self.source} {where}: {reason}: {shown}")

    def summary(self) -> str:
        """One line: the count, then the first few bad rows."""
        more = f"; and {self.count - len(self.examples)} more" if self.count > len(self.examples) else ""
        return f"{self.count} bad row(s) in {self.source}: " + "; ".join(self.examples) + more


class BadRowError(UserError):
    def __init__(self, report: BadRowReport):
        super().__init__(f"{report.summary()} (data.on_bad_row=skip skips such rows)")
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


def _example(row: Any, keys: RowKeys) -> tuple[GSM8KExample | None, str]:
    parts, reason = row_parts(row, keys, extract_final_answer)
    if parts is None:
        return None, reason
    return GSM8KExample(parts.question, parts.answer, parts.final_answer, parts.data_source,
                        parts.messages, parts.conversation), ""


def load_gsm8k_with_report(
    source: str | os.PathLike,
    split: str = "train",
    *,
    on_bad_row: OnBadRow = "skip",
    config_name: str | None = None,
    limit: int | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    prompt_key: str = "question",
    answer_key: str = "answer",
    messages_key: str | None = None,
    kind: SourceKind | None = None,
    field: str = "data path",
) -> tuple[list[GSM8KExample], BadRowReport]:
    """Load rows and return them with the report of the bad ones (see :func:`load_gsm8k`)."""
    if on_bad_row not in ("skip", "error"):
        raise UserError(f"data.on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    keys = RowKeys(prompt_key, answer_key, messages_key)
    opened = open_source(source, split, kind=kind, config_name=config_name, dataset_kwargs=dataset_kwargs,
                         field=field)
    if opened.columns is not None:
        check_columns(opened.columns, keys, opened.name)
    report = BadRowReport(source=opened.name)
    examples: list[GSM8KExample] = []
    seen = 0
    for raw in opened.rows:
        if limit is not None and len(examples) >= limit:
            break
        seen += 1
        example, reason = (None, raw.error) if raw.error else _example(raw.value, keys)
        if example is None:
            report.add(raw.where(), reason, raw.value)
            continue
        examples.append(example)
    if report.count and on_bad_row == "error":
        raise BadRowError(report)
    if not examples and limit != 0:
        if seen == 0:
            raise DataFileError(f"no examples in {opened.name}: it has no rows")
        raise DataFileError(f"no examples in {opened.name}: every row is bad; {report.summary()}")
    if report.count:
        logger.warning("skipped %s", report.summary())
    return examples, report


def load_gsm8k(source: str | os.PathLike, split: str = "train", **options: Any) -> list[GSM8KExample]:
    """Load examples from a jsonl/parquet file, a ``save_to_disk`` directory, or a datasets name/path
    (the examples of :func:`load_gsm8k_with_report`, whose keywords it takes).

    ``split`` selects the split for datasets sources (ignored for single files). ``config_name`` is
    passed to ``datasets.load_dataset`` (``openai/gsm8k`` defaults to ``"main"``), and so are
    ``dataset_kwargs`` (e.g. ``cache_dir``). ``limit`` keeps the first ``limit`` good rows.
    ``prompt_key`` / ``answer_key`` / ``messages_key`` name the row's parts (see
    :mod:`megagsm.data.layouts`); ``kind`` is ``data.source`` (a ``.jsonl`` path under ``parquet`` is
    refused) and ``field`` the config field the path came from. Bad rows are skipped with a warning,
    or raise :class:`BadRowError` when ``on_bad_row="error"``.
    """
    return load_gsm8k_with_report(source, split, **options)[0]


def data_paths(value: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """``data.train_path`` / ``eval_path`` as a list: one path, a list of paths, or verl's
    ``"['a.parquet', 'b.parquet']"`` spelling of a list inside a string."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value).strip()
        if text.startswith("[") and text.endswith("]"):
            import ast

            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):  # unquoted: [a.parquet, b.parquet]
                parsed = [p.strip().strip("'\"") for p in text[1:-1].split(",") if p.strip()]
            if not isinstance(parsed, (list, tuple)):
                raise UserError(f"data path {text!r}: looks like a list but is not one; "
                                "write ['a.parquet', 'b.parquet']")
            return data_paths(list(parsed))
        return [text] if text else []
    paths = list(value)
    if not all(isinstance(p, (str, os.PathLike)) and os.fspath(p).strip() for p in paths):
        raise UserError(f"data paths must be non-empty strings, got {paths!r}")
    return [os.fspath(p).strip() for p in paths]


def load_gsm8k_files(paths: str | Sequence[str], split: str = "train", **kwargs) -> list[GSM8KExample]:
    """The examples of several sources, in order (verl's ``train_files=[a, b]``); keywords as
    :func:`load_gsm8k`."""
    examples: list[GSM8KExample] = []
    for path in data_paths(paths):
        examples += load_gsm8k(path, split, **kwargs)
    return examples

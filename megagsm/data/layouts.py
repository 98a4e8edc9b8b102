"""Which columns of a row hold the prompt, the response and the ground truth.

Layouts recognised:

- **openai/gsm8k**: ``question`` and ``answer`` (a worked solution ending in ``#### N``).
- **verl's RL layout** (what verl's ``examples/data_preprocess/*.py`` write): ``data_source``, ``prompt``
  (a list of chat messages), ``ability``, ``reward_model`` {``style``, ``ground_truth``}, ``extra_info``
  {``split``, ``index``, ``answer``, ``question``}. Recognised by itself when ``data.prompt_key`` /
  ``data.answer_key`` keep their defaults: the prompt is the chat messages, the ground truth
  ``reward_model.ground_truth``, the response (for SFT) ``extra_info.answer`` when present.
- **any columns**, named by ``data.prompt_key`` / ``data.answer_key`` as dotted paths into nested
  columns: ``extra_info.question`` is verl's SFT spelling ``prompt_key=extra_info
  prompt_dict_keys=['question']``; ``extra_info['question']`` and list indices ``prompt[0].content``
  are accepted too. A prompt value that is a list of chat messages is kept as messages.
- **multi-turn chat** (``data.messages_key``, e.g. ``messages``): a list of {role, content}; SFT puts
  its loss on the assistant turns.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping

from megagsm.errors import UserError

DEFAULT_PROMPT_KEY = "question"
DEFAULT_ANSWER_KEY = "answer"
DEFAULT_DATA_SOURCE = "openai/gsm8k"
VERL_RL_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")
CHAT_ROLES = ("system", "user", "assistant", "tool")

_MISSING = object()
# a GSM8K ground truth: "72", "-3", "1,234", "2.5" (a leading "$" allowed)
_GSM8K_NUMBER = re.compile(r"\$?\s*-?[0-9][0-9,]*(?:\.[0-9]+)?")
_PATH_PART = re.compile(r"""\.?([A-Za-z_][\w\-]*)|\[\s*(?:(\d+)|'([^']*)'|"([^"]*)")\s*\]""")


@dataclass(frozen=True)
class RowKeys:
    """The config's names for a row's parts (data.prompt_key, data.answer_key, data.messages_key)."""

    prompt_key: str = DEFAULT_PROMPT_KEY
    answer_key: str = DEFAULT_ANSWER_KEY
    messages_key: str | None = None

    def __post_init__(self):
        for name in ("prompt_key", "answer_key", "messages_key"):
            value = getattr(self, name)
            if value is not None:
                parse_path(value, f"data.{name}")


def parse_path(path: str, field: str = "key") -> list[str | int]:
    """``a.b[0]['c']`` -> ``["a", "b", 0, "c"]``; a malformed path raises UserError naming ``field``."""
    return list(_parse_path(path, field))


@functools.lru_cache(maxsize=256)  # every row looks up the same few paths
def _parse_path(path: str, field: str) -> tuple[str | int, ...]:
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"{field}={path!r}: expected a column name or a dotted path such as extra_info.question")
    parts: list[str | int] = []
    pos, text = 0, path.strip()
    while pos < len(text):
        m = _PATH_PART.match(text, pos)
        if m is None or (pos == 0 and text.startswith(".")):
            raise UserError(f"{field}={path!r}: cannot read it as a dotted path (at character {pos + 1}); "
                            "use names like extra_info.question or extra_info['question']")
        name, index, single, double = m.groups()
        parts.append(int(index) if index is not None else next(p for p in (name, single, double) if p is not None))
        pos = m.end()
    return tuple(parts)


def lookup(row: Any, path: str) -> Any:
    """The value at a dotted path in a (nested) row, or the module's _MISSING marker (also for a null:
    parquet stores a struct field that a row lacks as null)."""
    value = row
    for part in _parse_path(path, "key"):
        if isinstance(part, int):
            if not isinstance(value, (list, tuple)) or not -len(value) <= part < len(value):
                return _MISSING
            value = value[part]
        else:
            if not isinstance(value, dict) or part not in value:
                return _MISSING
            value = value[part]
    return _MISSING if value is None else value


def is_missing(value: Any) -> bool:
    return value is _MISSING


def is_verl_rl_row(row: Mapping) -> bool:
    return isinstance(row.get("prompt"), (list, tuple)) and isinstance(row.get("reward_model"), dict)


def expected_columns(keys: RowKeys) -> str:
    if keys.messages_key:
        return f"{parse_path(keys.messages_key)[0]!r} (data.messages_key)"
    if (keys.prompt_key, keys.answer_key) == (DEFAULT_PROMPT_KEY, DEFAULT_ANSWER_KEY):
        return ("['question', 'answer'] (openai/gsm8k) or ['data_source', 'prompt', 'reward_model', ...] "
                "(verl's RL layout), or name yours with data.prompt_key / data.answer_key")
    return f"{parse_path(keys.prompt_key)[0]!r} (data.prompt_key) and {parse_path(keys.answer_key)[0]!r} (data.answer_key)"


def check_columns(columns: list[str], keys: RowKeys, name: str) -> None:
    """A source whose columns cannot hold what ``keys`` asks for is refused before any row is read."""
    have = set(columns)
    if keys.messages_key:
        ok = parse_path(keys.messages_key)[0] in have
    else:
        verl = {"prompt", "reward_model"} <= have
        prompt_ok = parse_path(keys.prompt_key)[0] in have or (keys.prompt_key == DEFAULT_PROMPT_KEY and verl)
        answer_ok = parse_path(keys.answer_key)[0] in have or (keys.answer_key == DEFAULT_ANSWER_KEY and verl)
        ok = prompt_ok and answer_ok
    if not ok:
        raise UserError(f"{name}: columns found {sorted(have)}; expected {expected_columns(keys)}")


def _messages(value: Any, field: str) -> tuple[tuple[dict, ...] | None, str]:
    """Chat messages as a tuple of plain {"role", "content"} dicts, or (None, reason)."""
    if not isinstance(value, (list, tuple)) or not value:
        return None, f"'{field}' is not a non-empty list of chat messages"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in CHAT_ROLES:
            return None, f"'{field}'[{i}] is not a chat message {{role: {'|'.join(CHAT_ROLES)}, content: text}}"
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out), ""


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _ground_truth(row: Mapping) -> tuple[str | None, str]:
    """verl's ``reward_model.ground_truth`` as text; (None, "") when the row has none."""
    if not isinstance(row.get("reward_model"), dict):
        return None, ""
    gt = row["reward_model"].get("ground_truth")
    if isinstance(gt, bool) or not isinstance(gt, (str, int, float)) or not str(gt).strip():
        return None, "'reward_model.ground_truth' is missing, empty or not text/number"
    return str(gt).strip(), ""


@dataclass(frozen=True)
class RowParts:
    question: str
    answer: str                                  # the response to train on ("" when the row has none)
    final_answer: str                            # the ground truth the rewards compare with ("" if none)
    data_source: str
    messages: tuple[dict, ...] | None = None     # the chat prompt
    conversation: tuple[dict, ...] | None = None  # a multi-turn SFT row, assistant turns included


def _last_user(messages: tuple[dict, ...]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def row_parts(row: Any, keys: RowKeys, extract_final_answer) -> tuple[RowParts | None, str]:
    """The parts of one row, or (None, reason naming the field). ``extract_final_answer(text)`` reads
    the ``#### N`` of a GSM8K solution (passed in: it lives with the GSM8K loader)."""
    if not isinstance(row, dict):
        return None, f"row is a {type(row).__name__}, not an object"
    source = row.get("data_source")
    data_source = source if isinstance(source, str) and source.strip() else DEFAULT_DATA_SOURCE
    truth, reason = _ground_truth(row)
    if reason:
        return None, reason
    if keys.messages_key:
        return _conversation_parts(row, keys.messages_key, truth, data_source, extract_final_answer)
    verl = is_verl_rl_row(row)

    value = lookup(row, keys.prompt_key)
    if is_missing(value) and verl and keys.prompt_key == DEFAULT_PROMPT_KEY:
        value, prompt_field = row["prompt"], "prompt"
    else:
        prompt_field = keys.prompt_key
    if is_missing(value):
        return None, f"missing '{keys.prompt_key}'"
    messages = None
    if isinstance(value, (list, tuple)):
        messages, reason = _messages(value, prompt_field)
        if reason:
            return None, reason
        question = _text(lookup(row, "extra_info.question")) or _last_user(messages)
    elif _text(value) is not None:
        question = value
    else:
        return None, f"'{prompt_field}' is empty or not text"

    value = lookup(row, keys.answer_key)
    if is_missing(value) and verl and keys.answer_key == DEFAULT_ANSWER_KEY:
        answer = _text(lookup(row, "extra_info.answer")) or ""
    elif is_missing(value):
        return None, f"missing '{keys.answer_key}'"
    elif _text(value) is None:
        return None, f"'{keys.answer_key}' is empty or not text"
    else:
        answer = value
    if truth is None:
        truth = extract_final_answer(answer)
        if truth is None:
            return None, f"'{keys.answer_key}' has no '#### <number>' final answer"
    elif data_source == DEFAULT_DATA_SOURCE and not _GSM8K_NUMBER.fullmatch(truth):
        return None, f"'reward_model.ground_truth' {truth[:40]!r} is not a number (data_source {data_source})"
    return RowParts(question, answer, truth, data_source, messages), ""


def _conversation_parts(row: Mapping, key: str, truth: str | None, data_source: str,
                        extract_final_answer) -> tuple[RowParts | None, str]:
    value = lookup(row, key)
    if is_missing(value):
        return None, f"missing '{key}'"
    conversation, reason = _messages(value, key)
    if reason:
        return None, reason
    assistant = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    if not assistant:
        return None, f"'{key}' has no assistant turn to train on"
    if assistant[0] == 0:
        return None, f"'{key}' starts with an assistant turn; a prompt turn must come first"
    last = assistant[-1]
    prompt = conversation[:last]
    answer = conversation[last]["content"]
    if truth is None:
        truth = extract_final_answer(answer) or ""
    return RowParts(_last_user(prompt), answer, truth, data_source, prompt, conversation), ""

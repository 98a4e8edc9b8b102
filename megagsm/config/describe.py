"""Every config field as `section.field  (default)  comment` lines, generated from the dataclasses
themselves (defaults) and their source (the trailing `# ...` comments), so `--help` never goes stale."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from .schema import RunConfig

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#=]*(?:=[^#]*)?#\s*(.+)$")


def _comments(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = {}
    for line in source.splitlines():
        m = _FIELD_LINE.match(line)
        if m:
            found.setdefault(m.group(1), m.group(2).strip())
    return found


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "???"


def _choices(tp) -> str:
    """'a|b|c' for a Literal (or Optional Literal) annotation, else ''."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is not typing.Literal else [tp]
    for arg in args:
        if typing.get_origin(arg) is typing.Literal:
            return "|".join(str(c) for c in typing.get_args(arg))
    return ""


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines += describe_fields(tp, f"{prefix}{f.name}.")
            continue
        default = _default(f)
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        choices = _choices(tp)
        text = f"  {prefix}{f.name} (default {shown}{'; ' + choices if choices else ''})"
        if f.name in comments:
            text += f": {comments[f.name]}"
        lines.append(text)
    return lines

"""YAML file + `key=value` overrides -> a typed, checked RunConfig (via omegaconf structured configs)."""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from .errors import ConfigError
from .schema import RunConfig


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file at `path` (if any) <- overrides like `parallel.tp=2`, in that order."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        _merge_into(cfg, _read_yaml(path), where=path)
    for item in overrides:
        _merge_into(cfg, _parse_override(item), where=f"override '{item}'")
    try:
        return OmegaConf.to_object(cfg)
    except oc_errors.OmegaConfBaseException as e:  # e.g. a broken ${interpolation}
        raise ConfigError(_describe(e)) from None


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML; load_config() on it gives back an equal RunConfig."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: RunConfig, path: str) -> None:
    """Write to_yaml(cfg) to `path` atomically (temp file in the same dir, then rename)."""
    from megagsm.utils.atomic import write_text_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, to_yaml(cfg))


def _read_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got a list")
    return loaded


def _parse_override(item: str) -> DictConfig:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' must look like section.field=value")
    try:
        return OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, oc_errors.OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"override '{item}': {' '.join(str(e).split())}") from None


def _merge_into(cfg: DictConfig, src: DictConfig, where: str) -> None:
    _check_keys(RunConfig, OmegaConf.to_container(src, resolve=False), prefix="", where=where)
    try:
        cfg.merge_with(src)
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"{_describe(e)} (in {where})") from None


def _check_keys(section: type, src: dict, prefix: str, where: str) -> None:
    """Unknown keys, and scalars where a section belongs (omegaconf reports the latter without a key)."""
    hints = typing.get_type_hints(section)
    for key, value in src.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown key '{full}' (in {where}){_suggest(str(key), hints)}")
        field_type = hints[key]
        if _strip_optional(field_type) is bool and not _is_bool_value(value, field_type):
            # omegaconf would turn 2, "yes" or "on" into true: a boolean field takes true/false only
            raise ConfigError(f"{full}: expected bool, got {value!r} (in {where}; allowed: true, false)")
        if isinstance(field_type, type) and dataclasses.is_dataclass(field_type):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping (a config section), got {value!r} (in {where})")
            _check_keys(field_type, value, prefix=f"{full}.", where=where)


def _is_bool_value(value: Any, field_type: Any) -> bool:
    if isinstance(value, bool):
        return True
    if value is None:
        return _strip_optional(field_type) is not field_type  # null only for Optional[bool]
    return isinstance(value, str) and value.startswith("${")  # an interpolation, resolved later


def _suggest(key: str, known: dict) -> str:
    close = difflib.get_close_matches(key, list(known), n=3)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _describe(e: oc_errors.OmegaConfBaseException) -> str:
    key = e.full_key or ""
    if isinstance(e, oc_errors.ConfigKeyError):
        return f"unknown key '{key}'"
    if isinstance(e, oc_errors.MissingMandatoryValue):
        return f"{key}: value is missing ('???')"
    if isinstance(e, oc_errors.ValidationError) and key:
        expected = _type_name(_field_type(key))
        if expected:
            return f"{key}: expected {expected}, got {e.value!r}"
    return f"{key}: {_one_line(e)}" if key else _one_line(e)


def _field_type(dotted: str) -> Any:
    """The annotation of RunConfig's field at `dotted` (list indices dropped), or None."""
    tp: Any = RunConfig
    for part in dotted.split("[")[0].split("."):
        tp = _strip_optional(tp)
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_name(tp: Any) -> str:
    if tp is None:
        return ""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        names = [_type_name(a) if a is not type(None) else "null" for a in typing.get_args(tp)]
        return " or ".join(names)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping (a config section)"
    return getattr(tp, "__name__", str(tp))


def _one_line(e: BaseException) -> str:
    text = getattr(e, "msg", None) or str(e)
    return " ".join(str(text).split("\n")[0].split()) or type(e).__name__

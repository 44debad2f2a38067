"""Dotted overrides (``optim.lr=3e-4``) and the configs' JSON form, for any tree of config dataclasses:
each value parsed and checked against its field's declared type. Generic, so a leaf: :mod:`mmssl.config`
re-exports it and adds :func:`mmssl.config.load_json` for a whole run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from data_pipelines.remote import credentials, mask

_C = TypeVar("_C")


def apply_overrides(cfg: _C, overrides: list[str]) -> _C:
    """Apply ``a.b.c=value`` strings in order. Values parse as JSON where they can (numbers, true/false,
    null, lists), else as plain strings; each is checked against the field's declared type."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (for example optim.lr=3e-4)")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node: Any = cfg
        walked = []
        one_key = bool(parents) and _is_mapping_field(cfg, parents)
        if one_key:  # mapping.key=value sets one key of a mapping field (mapping={...} replaces it)
            *parents, leaf, key = dotted.strip().split(".")
            dotted, raw = ".".join([*parents, leaf]), json.dumps({key: _parse_value(raw)})
        for part in parents:
            walked.append(part)
            if not dataclasses.is_dataclass(node) or part not in _field_names(node):
                raise ValueError(f"unknown config field {'.'.join(walked)!r} in override {item!r}")
            child = getattr(node, part)
            if child is None:  # switch a tower that is off back on, with its defaults
                child = _dataclass_type(_field_types(node)[part])()
                setattr(node, part, child)
            node = child
        if not dataclasses.is_dataclass(node) or leaf not in _field_names(node):
            raise ValueError(f"unknown config field {dotted!r} in override {item!r}")
        tp = _field_types(node)[leaf]
        try:
            value = _coerce(tp, _parse_value(raw), dotted)
        except ValueError as first:
            try:
                value = _coerce(tp, raw, dotted)  # a string field given something that looks like JSON
            except ValueError:
                raise first from None
        if one_key:
            value = {**getattr(node, leaf), **value}
        setattr(node, leaf, value)
    return cfg


def _is_mapping_field(cfg: Any, parts: list[str]) -> bool:
    """Whether the dotted path ``parts`` names a field of mapping type (``dict[str, ...]``)."""
    node: Any = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(node) or part not in _field_names(node):
            return False
        node = getattr(node, part)
    if node is None or not dataclasses.is_dataclass(node) or parts[-1] not in _field_names(node):
        return False
    return typing.get_origin(_field_types(node)[parts[-1]]) is dict


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build a config dataclass from plain data (the inverse of :func:`to_dict`), type-checking leaves."""
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ValueError(f"unknown config field {(path + '.' if path else '') + sorted(unknown)[0]!r}")
    kwargs = {
        name: _coerce(types_[name], value, f"{path}.{name}" if path else name) for name, value in data.items()
    }
    return cls(**kwargs)


def save_json(cfg: Any, path: str | Path) -> None:
    """Written to a temporary file and renamed: a rank reading it (another node's launcher may be
    writing the same file) never sees half of one. A URL's user:password part is written as ***."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(mask(json.dumps(to_dict(cfg), indent=2)) + "\n")
    os.replace(tmp, path)


def url_credentials(cfg: Any) -> dict[str, str]:
    """{masked URL start: the real one} for each URL in the config with a user:password part, so that
    ranks reading a saved (masked) config.json get them back from their launcher's environment."""
    return credentials(json.dumps(to_dict(cfg)))


# Settings added after runs were saved without them, with the value those runs trained with (a new run's
# default may differ): a saved config.json that lacks one rebuilds the model it was trained as.
SAVED_BEFORE: dict[str, Any] = {"objectives.masked_text.tie_head": False}


def with_saved_before(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config's plain data with each :data:`SAVED_BEFORE` setting it lacks filled in (in place)
    wherever its parent section is present."""
    for dotted, value in SAVED_BEFORE.items():
        *parents, name = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(name, value)
    return data


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _field_types(cls_or_obj: Any) -> dict[str, Any]:
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return typing.get_type_hints(cls)


def _dataclass_type(tp: Any) -> type:
    for arg in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(arg):
            return arg
    raise AssertionError(f"{tp} holds no dataclass")


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` and convert where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{path} cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f'{path} must be a mapping, e.g. {{"key": value}}, got {value!r}')
        key_tp, value_tp = args
        return {_coerce(key_tp, k, path): _coerce(value_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping of fields, got {value!r}")
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{path} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} at {path}")

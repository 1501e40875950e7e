"""Typed recipe configs: YAML in, dataclasses out, `key.sub=value` overrides, errors that name the key.

Every stage's config is a tree of dataclasses. `load_config(cls, path, overrides)` reads YAML, applies
overrides, and builds the tree, rejecting unknown keys and wrong types with the full dotted key and
what is allowed. Each field's meaning is documented once, beside the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A recipe that cannot be used; the message names the key and what is allowed."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `5e-5` (no dot) as a string; accept any numeric spelling.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_join(prefix, unknown[0])}: unknown key; allowed keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], _join(prefix, name))
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{key}: {raw!r} is not a YAML value ({first}); quote strings that hold "
                              "[ ] { } , : or #, e.g. key=['a[23]']") from None
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if p.isdigit() and isinstance(node, list):
                node = node[int(p)]
                continue
            if not isinstance(node.get(p), (dict, list)):
                node[p] = {}
            node = node[p]
        last = parts[-1]
        if last.isdigit() and isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Read a YAML recipe (or start empty), apply overrides, build and validate `cls`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {p}: no such file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {p}: invalid YAML ({e})") from None
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def import_object(spec: str, what: str, allowed: str = "'package.module:function'") -> typing.Callable:
    """The callable a recipe names as ``"package.module:name"`` (a user's verifier, tagger, teacher
    class). Raises ValueError naming ``what``, the spec and ``allowed`` when the spec is malformed,
    the module cannot be imported or the name is not a callable in it."""
    import importlib

    module_name, colon, attribute = str(spec).strip().partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"unknown {what} {spec!r}: use {allowed}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an ImportError or an error raised while importing it
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({err}); use {allowed}") from err
    obj = getattr(module, attribute, None)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r}: {module_name!r} has no callable {attribute!r}; use {allowed}")
    return obj

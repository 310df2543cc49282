"""Typed configs from YAML files and ``key=value`` overrides: the loader behind ``config.py``.

Dataclasses are filled field by field with each value converted to its annotated type, so a
typo or a wrong type in a week-long run's config fails in the first second with the key named;
renamed keys are refused with their new name, and configs saved by older versions are migrated
when read (:func:`load_saved`).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


def _describe(source: str, key: str) -> str:
    return f"{source}: '{key}'" if source else f"'{key}'"


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp``, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{_describe(source, key)} = {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{_describe(source, key)} = {value!r}; expected one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_describe(source, key)} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".", source=source)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_describe(source, key)} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_describe(source, key)} needs {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_describe(source, key)} must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_describe(source, key)} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{_describe(source, key)} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_describe(source, key)} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_describe(source, key)} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "", source: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{_describe(source, prefix + str(unknown[0]))} is not a config key"
            f" (known under '{prefix or '<top>'}': {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name, source) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain nested dicts/lists of a config, ready for YAML or JSON (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (['a','b','c'], value); the value is parsed as YAML (so 1e-4, [16,32], true work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from err
    return key.split("."), value


def merge_override(data: dict, parts: list[str], value: Any) -> None:
    """Set data[parts[0]][parts[1]]... = value, creating nested mappings as needed."""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"override '{'.'.join(parts)}': '{part}' is not a section")
            node[part] = child
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with safe_load; a missing file or non-mapping is an error naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``key=value`` overrides, in that order.

    A key that ``cls.RENAMED`` lists is refused with its new name (silently mapping it would
    hide that an old config's meaning changed; a saved config is migrated by :func:`load_saved`).
    """
    renamed = getattr(cls, "RENAMED", {})
    source = str(path) if path is not None else ""
    data = to_dict(cls())
    if path is not None:
        file_data = read_yaml(path)
        refuse_renamed(file_data, renamed, source)
        from_dict(cls, file_data, source=source)  # names unknown keys against the file itself
        data = _deep_merge(data, file_data)
    for text in overrides:
        parts, value = parse_override(text)
        nested: dict = {}
        merge_override(nested, parts, value)
        refuse_renamed(nested, renamed, "override")
        merge_override(data, parts, value)
    return from_dict(cls, data, source=source or "overrides")


def load_saved(cls: type[T], path: str | Path) -> T:
    """A config written by an earlier run (a checkpoint's config.yaml), old key names migrated."""
    data = migrate(read_yaml(path), getattr(cls, "RENAMED", {}))
    return from_dict(cls, _deep_merge(to_dict(cls()), data), source=str(path))


def _dotted(data: Mapping, prefix: str = "") -> list[str]:
    """Every key of a nested mapping as a dotted path (sections and leaves)."""
    keys = []
    for k, v in data.items():
        keys.append(prefix + str(k))
        if isinstance(v, Mapping):
            keys += _dotted(v, prefix + str(k) + ".")
    return keys


def refuse_renamed(data: Mapping, renamed: Mapping[str, str], source: str) -> None:
    """ConfigError naming the new key when ``data`` uses a renamed one."""
    for key in _dotted(data):
        if key in renamed:
            raise ConfigError(f"{_describe(source, key)} was renamed: use '{renamed[key]}' instead "
                              "(progress and intervals are counted in patches seen)")


def migrate(data: dict, renamed: Mapping[str, str]) -> dict:
    """``data`` with every renamed key moved to its new place (the value is kept as it was)."""
    out = copy.deepcopy(data)
    for old, new in renamed.items():
        *sec, leaf = old.split(".")
        node = out
        for part in sec:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            target = out
            *new_sec, new_leaf = new.split(".")
            for part in new_sec:
                target = target.setdefault(part, {})
            target.setdefault(new_leaf, value)
    return out


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def save(obj: Any, path: str | Path) -> None:
    """Write a config as YAML (used to store the resolved config beside checkpoints)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))

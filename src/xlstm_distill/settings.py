"""Documented, typed settings: dataclass fields that carry their meaning (the reference pages are generated from
them), read from mappings (YAML recipes, saved configs) with unknown keys refused and values checked."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import field
from typing import Any, Union


def setting(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (``docs/recipes.md`` is generated from it). A list, dict or set
    default is copied for every instance."""
    if isinstance(default, (dict, list, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


def from_mapping(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys refused (naming the valid ones), values checked against
    the field types (an int where a float is asked is taken; YAML's "1e-5" strings are read as numbers)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {raw!r}.")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys of {where}: {', '.join(names)}.")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(raw[f.name], hints[f.name], f"{where}.{f.name}" if where != "recipe" else f.name)
        elif f.default is ... :
            raise ValueError(f"{where}: the key {f.name} is required ({f.metadata.get('doc', '')}).")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is none of {type_name(hint)}.")
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, {} if value is None else value, where)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}.")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and value != int(value)):
            raise ValueError(f"{where} must be {'an integer' if hint is int else 'a number'}, got {value!r}.")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}.")
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{where}[{n}]") for n, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}.")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: no reader for the type {hint!r}.")


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "section"
    return re.sub(r"\btyping\.", "", getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint))

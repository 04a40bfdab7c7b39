"""Typed dataclasses from plain data: every key and value checked against the annotations.

Anything wrong is a ``RecipeError`` with a one-line message naming the dotted key
(``train.scheduler``) and what is allowed; values are shortened so the line stays short.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from squat_cli.errors import RecipeError

MAX_INT = 2**53
"""Largest integer a recipe value may hold (what a float represents exactly)."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        return f"a mapping of {_type_name(ktp)} to {_type_name(vtp)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    bad = RecipeError(f"{key}: {_short(value)} is not valid; expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            return _coerce(key, real[0], value)
        classes = [a for a in real if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(classes) == 1:  # a mapping can only mean the section: say what is wrong
            return build(classes[0], value, key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except RecipeError:
                continue
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        ktp, vtp = typing.get_args(tp)
        return {_coerce(f"{key} key", ktp, k): _coerce(f"{key}.{k}", vtp, v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        if abs(value) > MAX_INT:
            raise RecipeError(f"{key}: {_short(value)} is out of range (at most {MAX_INT} in size)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(float(value)):
            raise RecipeError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad  # pragma: no cover - only the types above are used


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            shown = full if len(full) <= 80 else full[:77] + "..."
            raise RecipeError(f"{shown}: unknown key; allowed: {', '.join(names)}")
        kwargs[key] = _coerce(full, hints[key], value)
    return cls(**kwargs)

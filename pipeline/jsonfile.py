"""The pipeline's JSON files (meta.json, stats.json, model.json) read back strictly.

A file that is not JSON fails with its name and the line and column json stopped at; a
value of the wrong shape fails with the file and the key, before anything uses it: a
stats file with two channels or a manifest whose shard list is a string would otherwise
fail much later, deep inside training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from typing import Any


def parse(data: str | bytes, source: str) -> dict[str, Any]:
    """The JSON object in `data`, the text of the file `source`.

    Raises:
        ValueError: `<source>: invalid JSON at line L column C: <json's message>`, or the
            text is not UTF-8, or its top level is not an object.
    """
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    return raw


def check_fields(cls: type, raw: Mapping[str, Any], source: str, skip: tuple[str, ...] = ()) -> None:
    """Checks `raw` against the fields of dataclass `cls`: every field without a default
    present, no unknown key, each value of the field's type (str, int, float, bool, and
    list, tuple and dict of those, nested; floats finite).

    Args:
        cls: The dataclass the file loads into.
        raw: The file's object.
        source: The file, for messages.
        skip: Fields checked by their own parser (nested dataclasses); still required.

    Raises:
        ValueError: Naming `source`, the key, its value and the expected type.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in raw:
            if required:
                raise ValueError(f"{source}: missing key {f.name!r}")
            continue
        if f.name not in skip and not _matches(raw[f.name], hints[f.name]):
            shown = json.dumps(raw[f.name])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ValueError(f"{source}: {f.name}={shown}: expected {_describe(hints[f.name])}")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}")


def _matches(value: Any, tp: Any) -> bool:
    """Whether the JSON value `value` has type `tp` (a list stands for a tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_matches, value, args))
    if origin is dict:
        return isinstance(value, dict) and all(_matches(v, args[1]) for v in value.values())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"no JSON check for type {tp}")


def _describe(tp: Any) -> str:
    """`tp` as people write it: list[str], tuple[float, float, float], dict[str, int]."""
    args = typing.get_args(tp)
    if not args:
        return getattr(tp, "__name__", str(tp))
    inner = ", ".join("..." if a is Ellipsis else _describe(a) for a in args)
    return f"{typing.get_origin(tp).__name__}[{inner}]"

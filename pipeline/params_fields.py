"""The checks behind params.yaml's sections: a typed field's value, its bounds and its
section's keys, each failure a `ParamsError` naming the key, the value and what is allowed.
`pipeline.config` declares the sections with these."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Literal, TypeVar


class ParamsError(ValueError):
    """A params.yaml value that is missing, unknown, mistyped or out of range."""


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """Field metadata for a numeric bound: lo <= v <= hi (lo < v when lo_open)."""
    return {"range": (lo, hi, lo_open)}


# Field metadata of a string that may be "" (meaning "not set"); other strings must not be blank.
EMPTY_OK = {"empty_ok": True}


class Section:
    """Base of the section dataclasses: each field is checked against its type and
    bounds when the section is built, so a section made in code is as valid as one read
    from params.yaml."""

    SECTION = ""  # the section's name in params.yaml, for error messages

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = check_value(f"{self.SECTION}.{f.name}", getattr(self, f.name), hints[f.name], f.metadata)
            object.__setattr__(self, f.name, value)  # int -> float where the type is float


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


T = TypeVar("T")


def describe(tp: Any) -> str:
    """Human-readable form of an allowed type, for error messages."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def check_value(key: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Returns `value` coerced to `tp` (int -> float only) or raises ParamsError."""
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise ParamsError(f"{key}={value!r}: expected {describe(tp)}")
        return value
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:  # an int beyond float's range
                ok = False
            else:
                ok = math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str) and (value.strip() != "" or (value == "" and meta.get("empty_ok", False)))
    else:  # pragma: no cover - a new field type must be handled above
        raise TypeError(f"unsupported params type {tp} for {key}")
    if not ok:
        raise ParamsError(f"{key}={value!r}: expected {describe(tp)}")
    if "choices" in meta and value not in meta["choices"]:
        raise ParamsError(f"{key}={value!r}: expected one of {', '.join(map(repr, meta['choices']))}")
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and value > hi
        if too_low or too_high:
            lo_txt = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
            hi_txt = "" if hi is None else f" <= {hi}"
            raise ParamsError(f"{key}={value!r}: expected {describe(tp)} with {lo_txt}value{hi_txt}")
    return value


def parse_section(name: str, raw: Any, cls: type[T]) -> T:
    """Builds the frozen dataclass `cls` from the mapping `raw` of section `name`.

    Args:
        name: Section name, used in error messages (``train``).
        raw: The section's mapping from YAML; None means all defaults.
        cls: The section's dataclass.

    Returns:
        The validated, frozen section.

    Raises:
        ParamsError: On an unknown key, a wrong type or an out-of-range value.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{name}: expected a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be numbers too
    if unknown:
        raise ParamsError(f"{name}.{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(fields))}")
    return cls(**raw)

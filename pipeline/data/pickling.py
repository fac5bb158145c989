"""Pickling the small frozen records that every shard task ships by the thousand."""

from __future__ import annotations

import operator
from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def pickled_by_fields(cls: type[T]) -> type[T]:
    """Class decorator for a frozen slots dataclass of two or more fields: pickles it as
    its constructor's arguments.

    The dataclass's own pickling of a slots class restores an instance in a Python loop
    over its `fields()`, far slower than calling the generated constructor; a shard task's
    job holds a Record (and its Location) per image.
    """
    values = operator.attrgetter(*(f.name for f in fields(cls)))  # instance -> tuple of field values
    cls.__reduce__ = lambda self: (cls, values(self))  # type: ignore[method-assign,assignment]
    return cls

"""CESQL values, errors and the casts between the three primitive types (spec 3.1, 3.3, 3.7)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Final

INT_MIN: Final = -(2**31)
INT_MAX: Final = 2**31 - 1

# A CESQL value is a Python bool, int (32 bit) or str. ``MISSING`` is what an identifier
# naming an absent attribute evaluates to: the operator that receives it returns the zero
# value of its own type (spec 3.2).
Value = bool | int | str


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
Result = Value | _Missing


class Kind(StrEnum):
    """The error types every engine supports (spec 3.3)."""

    PARSE = "ParseError"
    MATH = "MathError"
    CAST = "CastError"
    MISSING_ATTRIBUTE = "MissingAttributeError"
    MISSING_FUNCTION = "MissingFunctionError"
    FUNCTION = "FunctionEvaluationError"
    GENERIC = "GenericError"


class CesqlError:
    """One entry of an evaluation's error list."""

    __slots__ = ("kind", "message")

    def __init__(self, kind: Kind, message: str) -> None:
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def __repr__(self) -> str:
        return f"CesqlError({self.kind.value!r}, {self.message!r})"


Errors = list[CesqlError]

BOOL: Final = "Boolean"
INT: Final = "Integer"
STR: Final = "String"


def type_name(value: Value) -> str:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    return STR


def in_range(n: int) -> bool:
    return INT_MIN <= n <= INT_MAX


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def to_int(value: Value, errors: Errors) -> int:
    if isinstance(value, bool):
        return 1 if value else 0
    if isinstance(value, int):
        return value
    text = value
    if _INT_TEXT.fullmatch(text):
        n = int(text)
        if in_range(n):
            return n
    errors.append(CesqlError(Kind.CAST, f"cannot cast {_show(text)} to Integer"))
    return 0


def to_bool(value: Value, errors: Errors) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    low = value.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    errors.append(CesqlError(Kind.CAST, f"cannot cast {_show(value)} to Boolean"))
    return False


def to_str(value: Value, errors: Errors) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return value


CASTS: dict[str, Callable[[Value, Errors], Value]] = {BOOL: to_bool, INT: to_int, STR: to_str}
ZERO: dict[str, Value] = {BOOL: False, INT: 0, STR: ""}


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def from_python(value: Any) -> Result:
    """A value found in an event (an attribute, an extension, a field of the data).

    Booleans, integers in the 32 bit range and strings are themselves; ``None`` is absent;
    anything else is represented by a String (spec 3.2): other numbers by their JSON text,
    objects and arrays by their compact JSON, bytes as UTF-8 text when they are.
    """
    if value is None:
        return MISSING
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if in_range(value) else str(value)
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return MISSING
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(value)


def like_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a LIKE pattern (spec 3.4.3): ``%`` any run, ``_`` one
    character, ``\\%`` and ``\\_`` themselves; any other character (a lone backslash too)
    stands for itself, case sensitive."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and pattern[i + 1] in "%_":
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "%":
            out.append(".*")
        elif c == "_":
            out.append(".")
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)

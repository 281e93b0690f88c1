"""The built-in functions every CESQL engine supports (spec 3.5) and the casting functions
``INT``, ``BOOL``, ``STRING`` (the casts of 3.7 under the names the spec's examples use)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mesh.cesql._values import (
    BOOL,
    CASTS,
    INT,
    INT_MAX,
    INT_MIN,
    STR,
    CesqlError,
    Errors,
    Kind,
    Value,
)

ANY = "Any"


@dataclass(frozen=True)
class Function:
    name: str
    params: tuple[str, ...]  # the fixed parameters' types
    variadic: str | None  # the type of the repeated tail, if any
    returns: str
    impl: Callable[[list[Value], Errors], Value]

    def accepts(self, arity: int) -> bool:
        if self.variadic is None:
            return arity == len(self.params)
        return arity >= len(self.params)

    def param_type(self, i: int) -> str:
        if i < len(self.params):
            return self.params[i]
        assert self.variadic is not None
        return self.variadic


def _fail(errors: Errors, message: str) -> None:
    errors.append(CesqlError(Kind.FUNCTION, message))


def _left(a: list[Value], errors: Errors) -> Value:
    s, n = str(a[0]), int(a[1])
    if n < 0:
        _fail(errors, f"LEFT: negative length {n}")
        return s
    return s[:n]


def _right(a: list[Value], errors: Errors) -> Value:
    s, n = str(a[0]), int(a[1])
    if n < 0:
        _fail(errors, f"RIGHT: negative length {n}")
        return s
    return s[len(s) - n :] if n < len(s) else s


def _substring(a: list[Value], errors: Errors) -> Value:
    s, pos = str(a[0]), int(a[1])
    length = int(a[2]) if len(a) == 3 else None
    if pos > len(s) or pos < -len(s):
        _fail(errors, f"SUBSTRING: position {pos} is outside a string of length {len(s)}")
        return ""
    if length is not None and length < 0:
        _fail(errors, f"SUBSTRING: negative length {length}")
        return ""
    if pos == 0:
        return ""
    start = pos - 1 if pos > 0 else len(s) + pos
    return s[start:] if length is None else s[start : start + length]


def _abs(a: list[Value], errors: Errors) -> Value:
    n = int(a[0])
    if n == INT_MIN:
        errors.append(CesqlError(Kind.MATH, "ABS(-2147483648) overflows; 2147483647 returned"))
        return INT_MAX
    return abs(n)


def _cast(target: str) -> Callable[[list[Value], Errors], Value]:
    cast = CASTS[target]
    return lambda a, errors: cast(a[0], errors)


_ALL = [
    Function("LENGTH", (STR,), None, INT, lambda a, e: len(str(a[0]))),
    Function("CONCAT", (), STR, STR, lambda a, e: "".join(str(x) for x in a)),
    Function("CONCAT_WS", (STR,), STR, STR, lambda a, e: str(a[0]).join(str(x) for x in a[1:])),
    Function("LOWER", (STR,), None, STR, lambda a, e: str(a[0]).lower()),
    Function("UPPER", (STR,), None, STR, lambda a, e: str(a[0]).upper()),
    Function("TRIM", (STR,), None, STR, lambda a, e: str(a[0]).strip()),
    Function("LEFT", (STR, INT), None, STR, _left),
    Function("RIGHT", (STR, INT), None, STR, _right),
    Function("SUBSTRING", (STR, INT), None, STR, _substring),
    Function("SUBSTRING", (STR, INT, INT), None, STR, _substring),
    Function("ABS", (INT,), None, INT, _abs),
    Function("INT", (ANY,), None, INT, _cast(INT)),
    Function("BOOL", (ANY,), None, BOOL, _cast(BOOL)),
    Function("STRING", (ANY,), None, STR, _cast(STR)),
]

BUILTINS: dict[str, list[Function]] = {}
for _f in _ALL:
    BUILTINS.setdefault(_f.name, []).append(_f)


def lookup(name: str, arity: int) -> Function | None:
    for f in BUILTINS.get(name, ()):
        if f.accepts(arity):
            return f
    return None

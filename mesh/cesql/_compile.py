"""Syntax tree -> a tree of closures, type-checked, with constant parts folded.

Evaluation is the spec's "complete evaluation mode": every operator returns a value of its
type and appends what went wrong to an error list. An identifier naming an absent attribute
yields ``MISSING`` (and a MissingAttributeError); the operator or function receiving it
returns the zero value of its own return type (3.2). Integers are 32 bit: a result outside
the range is a MathError and 0 (the spec leaves overflow open).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mesh.cesql._functions import ANY, lookup
from mesh.cesql._syntax import Attr, Binary, Call, Data, Exists, In, Like, Lit, Node, Unary
from mesh.cesql._values import (
    BOOL,
    CASTS,
    INT,
    MISSING,
    STR,
    ZERO,
    CesqlError,
    Errors,
    Kind,
    Result,
    Value,
    from_python,
    in_range,
    like_regex,
    to_bool,
    to_int,
    to_str,
    type_name,
)


class Input(Protocol):
    """What an expression reads: attributes by name, and the data."""

    def attribute(self, name: str) -> Any:
        """The attribute's value, or None when the event has no such attribute."""

    @property
    def data(self) -> Any: ...


class CompileProblem(ValueError):
    pass


Fn = Callable[[Input, Errors], Result]


class Compiled:
    __slots__ = ("constant", "fn", "type")

    def __init__(self, fn: Fn, type_: str | None, constant: bool) -> None:
        self.fn = fn
        self.type = type_  # BOOL, INT, STR, or None when only known at run time
        self.constant = constant


# What mesh's attributes hold: strings, but meshhops (Integer) and meshreplay (Boolean).
ATTRIBUTE_TYPES = {
    "id": STR,
    "source": STR,
    "type": STR,
    "specversion": STR,
    "time": STR,
    "datacontenttype": STR,
    "subject": STR,
    "meshorigin": STR,
    "meshhops": INT,
    "meshreplay": BOOL,
}
REQUIRED = frozenset({"id", "source", "type", "specversion"})


def _missing(name: str) -> CesqlError:
    return CesqlError(Kind.MISSING_ATTRIBUTE, f"the event has no attribute {name!r}")


def _attr(node: Attr) -> Compiled:
    name = node.name

    def fn(inp: Input, errors: Errors) -> Result:
        value = from_python(inp.attribute(name))
        if value is MISSING:
            errors.append(_missing(name))
        return value

    return Compiled(fn, ATTRIBUTE_TYPES.get(name), False)


def _walk(value: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        if isinstance(step, int):
            if not isinstance(value, list | tuple) or step >= len(value):
                return None
        elif not isinstance(value, dict) or step not in value:
            return None
        value = value[step]
    return value


def _show_path(path: tuple[str | int, ...]) -> str:
    return "data" + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path)


def _data(node: Data) -> Compiled:
    path = node.path
    shown = _show_path(path)

    def fn(inp: Input, errors: Errors) -> Result:
        value = from_python(_walk(inp.data, path))
        if value is MISSING:
            errors.append(_missing(shown))
        return value

    return Compiled(fn, None, False)


def _exists(node: Exists) -> Compiled:
    ref = node.ref
    if isinstance(ref, Attr):
        name = ref.name
        if name in REQUIRED:
            return Compiled(lambda inp, errors: True, BOOL, True)

        def fn(inp: Input, errors: Errors) -> Result:
            return inp.attribute(name) is not None

        return Compiled(fn, BOOL, False)
    path = ref.path

    def data_fn(inp: Input, errors: Errors) -> Result:
        return _walk(inp.data, path) is not None

    return Compiled(data_fn, BOOL, False)


def _cast_fn(c: Compiled, target: str) -> Fn:
    """``c``'s closure with its value cast to ``target`` (MISSING passes through)."""
    fn = c.fn
    if c.type == target:
        return fn
    cast = CASTS[target]

    def casted(inp: Input, errors: Errors) -> Result:
        value = fn(inp, errors)
        if value is MISSING:
            return value
        return cast(value, errors)  # type: ignore[arg-type]

    return casted


def _checked_int(n: int, errors: Errors, what: str) -> int:
    if in_range(n):
        return n
    errors.append(CesqlError(Kind.MATH, f"{what} overflows 32 bits"))
    return 0


def _unary(node: Unary, operand: Compiled) -> Compiled:
    if node.op == "NOT":
        f = _cast_fn(operand, BOOL)

        def not_(inp: Input, errors: Errors) -> Result:
            v = f(inp, errors)
            return False if v is MISSING else not v

        return Compiled(not_, BOOL, operand.constant)
    g = _cast_fn(operand, INT)

    def neg(inp: Input, errors: Errors) -> Result:
        v = g(inp, errors)
        return 0 if v is MISSING else _checked_int(-v, errors, "negation")  # type: ignore[operator]

    return Compiled(neg, INT, operand.constant)


def _arith(op: str) -> Callable[[int, int, Errors], int]:
    def div(a: int, b: int, errors: Errors) -> int:
        if b == 0:
            errors.append(CesqlError(Kind.MATH, "division by zero"))
            return 0
        q = abs(a) // abs(b)
        return _checked_int(q if (a < 0) == (b < 0) else -q, errors, "division")

    def mod(a: int, b: int, errors: Errors) -> int:
        if b == 0:
            errors.append(CesqlError(Kind.MATH, "modulo by zero"))
            return 0
        r = abs(a) % abs(b)
        return -r if a < 0 else r

    return {
        "+": lambda a, b, e: _checked_int(a + b, e, "addition"),
        "-": lambda a, b, e: _checked_int(a - b, e, "subtraction"),
        "*": lambda a, b, e: _checked_int(a * b, e, "multiplication"),
        "/": div,
        "%": mod,
    }[op]


_ORDER: dict[str, Callable[[int, int], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _binary(node: Binary, left: Compiled, right: Compiled) -> Compiled:
    op = node.op
    constant = left.constant and right.constant
    if op in ("AND", "OR", "XOR"):
        lf, rf = _cast_fn(left, BOOL), _cast_fn(right, BOOL)
        if op == "AND":

            def and_(inp: Input, errors: Errors) -> Result:
                a = lf(inp, errors)
                if a is MISSING or not a:
                    return False
                b = rf(inp, errors)
                return False if b is MISSING else b

            return Compiled(and_, BOOL, constant)
        if op == "OR":

            def or_(inp: Input, errors: Errors) -> Result:
                a = lf(inp, errors)
                if a is MISSING:
                    return False
                if a:
                    return True
                b = rf(inp, errors)
                return False if b is MISSING else b

            return Compiled(or_, BOOL, constant)

        def xor(inp: Input, errors: Errors) -> Result:
            a = lf(inp, errors)
            b = rf(inp, errors)
            if a is MISSING or b is MISSING:
                return False
            return a != b

        return Compiled(xor, BOOL, constant)
    if op in ("=", "!=", "<>"):
        return _equality(op != "=", left, right, constant)
    lf, rf = _cast_fn(left, INT), _cast_fn(right, INT)
    if op in _ORDER:
        order = _ORDER[op]

        def compare(inp: Input, errors: Errors) -> Result:
            a = lf(inp, errors)
            b = rf(inp, errors)
            if a is MISSING or b is MISSING:
                return False
            return order(a, b)  # type: ignore[arg-type]

        return Compiled(compare, BOOL, constant)
    arith = _arith(op)

    def arithmetic(inp: Input, errors: Errors) -> Result:
        a = lf(inp, errors)
        b = rf(inp, errors)
        if a is MISSING or b is MISSING:
            return 0
        return arith(a, b, errors)  # type: ignore[arg-type]

    return Compiled(arithmetic, INT, constant)


def _equality(negated: bool, left: Compiled, right: Compiled, constant: bool) -> Compiled:
    """``=`` is defined for three pairs of one type: the right operand's type picks which,
    and the left one is cast to it (3.7); a failed cast gives false (the zero value)."""
    lf, rf = left.fn, right.fn

    def equal(inp: Input, errors: Errors) -> Result:
        a = lf(inp, errors)
        b = rf(inp, errors)
        if a is MISSING or b is MISSING:
            return False
        if type(a) is not type(b):
            before = len(errors)
            a = CASTS[type_name(b)](a, errors)  # type: ignore[arg-type]
            if len(errors) > before:
                return False
        return (a != b) if negated else (a == b)

    return Compiled(equal, BOOL, constant)


def _like(node: Like, operand: Compiled) -> Compiled:
    regex = like_regex(node.pattern)
    match, negated = regex.fullmatch, node.negated
    f = _cast_fn(operand, STR)

    def like(inp: Input, errors: Errors) -> Result:
        v = f(inp, errors)
        if v is MISSING:
            return False
        found = match(v) is not None  # type: ignore[arg-type]
        return found != negated

    return Compiled(like, BOOL, operand.constant)


def _in(node: In, operand: Compiled, items: list[Compiled]) -> Compiled:
    """The left operand's type is the target type of the set's elements (3.7)."""
    f, fns, negated = operand.fn, [i.fn for i in items], node.negated

    def in_(inp: Input, errors: Errors) -> Result:
        v = f(inp, errors)
        if v is MISSING:
            return False
        cast = CASTS[type_name(v)]  # type: ignore[arg-type]
        found = False
        for g in fns:
            item = g(inp, errors)
            if item is not MISSING and cast(item, errors) == v:  # type: ignore[arg-type]
                found = True
                break
        return found != negated

    constant = operand.constant and all(i.constant for i in items)
    return Compiled(in_, BOOL, constant)


def _call(node: Call, args: list[Compiled]) -> Compiled:
    func = lookup(node.name, len(args))
    if func is None:
        raise CompileProblem(
            f"{Kind.MISSING_FUNCTION}: no function {node.name} taking {len(args)} argument(s)"
        )
    fns = [
        a.fn if func.param_type(i) == ANY else _cast_fn(a, func.param_type(i))
        for i, a in enumerate(args)
    ]
    impl, zero = func.impl, ZERO[func.returns]

    def call(inp: Input, errors: Errors) -> Result:
        values: list[Value] = []
        for g in fns:
            v = g(inp, errors)
            if v is MISSING:
                return zero
            values.append(v)  # type: ignore[arg-type]
        return impl(values, errors)

    return Compiled(call, func.returns, all(a.constant for a in args))


def compile_node(node: Node) -> Compiled:
    """Compile a tree; constant subtrees are evaluated now, and one that fails is an error."""
    out = _compile(node)
    if out.constant and not isinstance(node, Lit):
        errors: Errors = []
        value = out.fn(_NO_INPUT, errors)
        if errors:
            raise CompileProblem(str(errors[0]))
        return Compiled(lambda inp, errs: value, out.type, True)
    return out


def _compile(node: Node) -> Compiled:
    if isinstance(node, Lit):
        value = node.value
        if type(value) is int and not in_range(value):
            raise CompileProblem(f"integer literal {value} is outside the 32 bit range")
        return Compiled(lambda inp, errors: value, type_name(value), True)
    if isinstance(node, Attr):
        return _attr(node)
    if isinstance(node, Data):
        return _data(node)
    if isinstance(node, Exists):
        return _exists(node)
    if isinstance(node, Unary):
        return _unary(node, compile_node(node.operand))
    if isinstance(node, Binary):
        return _binary(node, compile_node(node.left), compile_node(node.right))
    if isinstance(node, Like):
        return _like(node, compile_node(node.operand))
    if isinstance(node, In):
        return _in(node, compile_node(node.operand), [compile_node(i) for i in node.items])
    return _call(node, [compile_node(a) for a in node.args])


class _NoInput:
    data = None

    def attribute(self, name: str) -> Any:
        return None


_NO_INPUT = _NoInput()

__all__ = ["CompileProblem", "Compiled", "Input", "compile_node", "to_bool", "to_int", "to_str"]

"""CloudEvents SQL (CESQL v1) expressions: parse, type-check, evaluate.

::

    expr = compile_expression("type LIKE 'order.%' AND data.total > 100")
    passed, errors = expr.matches(event_input)

mesh implements the language itself (no maintained CESQL library exists for Python): lark
parses the spec's grammar (``_syntax``), ``_compile`` turns the tree into closures and
folds the constant parts, ``_functions`` holds the built-ins. Beyond the spec, ``data``,
``data.a.b``, ``data.list[0]`` and ``data['key']`` read the event's data (mesh's extension).
"""

from __future__ import annotations

from mesh.cesql._compile import Compiled, CompileProblem, Input, compile_node
from mesh.cesql._syntax import Attr, Binary, Like, Lit, Node, SyntaxProblem, parse
from mesh.cesql._values import BOOL, MISSING, CesqlError, Kind, Value
from mesh.errors import ExpressionError

MAX_LENGTH = 4096  # characters of expression text

__all__ = ["CesqlError", "Expression", "Input", "Kind", "compile_expression", "type_pattern"]


class Expression:
    """A compiled CESQL expression. Pure: evaluating it never changes its input."""

    __slots__ = ("_fn", "text", "type")

    def __init__(self, text: str, compiled: Compiled) -> None:
        self.text = text
        self.type = compiled.type
        self._fn = compiled.fn

    def evaluate(self, inp: Input) -> tuple[Value, list[CesqlError]]:
        """The value and the error list (complete evaluation mode). An expression that is
        only an absent attribute evaluates to false (the spec's assumed Boolean)."""
        errors: list[CesqlError] = []
        value = self._fn(inp, errors)
        if value is MISSING:
            return False, errors
        return value, errors  # type: ignore[return-value]

    def matches(self, inp: Input) -> tuple[bool, list[CesqlError]]:
        """As a filter (spec 1.2): passes only a Boolean true with no errors."""
        value, errors = self.evaluate(inp)
        return (value is True and not errors), errors

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def compile_expression(text: str, *, condition: bool = False) -> Expression:
    """Parse and type-check ``text``; raises ExpressionError with a one-line reason.

    With ``condition``, the expression must be able to yield a Boolean (a filter).
    """
    if not text.strip():
        raise ExpressionError("empty CESQL expression")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"CESQL expression longer than {MAX_LENGTH} characters")
    try:
        compiled = compile_node(parse(text))
    except SyntaxProblem as exc:
        raise ExpressionError(f"CESQL ParseError: {exc}") from None
    except CompileProblem as exc:
        raise ExpressionError(f"CESQL {exc}") from None
    except RecursionError:
        raise ExpressionError("CESQL expression nested too deeply") from None
    if condition and compiled.type not in (BOOL, None):
        raise ExpressionError(
            f"a filter must be a condition (Boolean); this expression is {compiled.type}"
        )
    return Expression(text, compiled)


def type_pattern(text: str) -> str | None:
    """A NATS-style type pattern every event passing ``text`` must match, when the
    expression says so plainly: a top-level ``AND`` clause ``type = 'a.b'`` gives
    ``a.b``, ``type LIKE 'a.%'`` gives ``a.>``. None otherwise (or when it does not parse).
    Consumers narrow their subjects with it, so the server drops what the filter would."""
    from mesh.errors import ValidationError
    from mesh.subjects import validate_pattern

    try:
        node = parse(text)
    except SyntaxProblem:
        return None
    for clause in _and_clauses(node):
        pattern = _clause_pattern(clause)
        if pattern is None:
            continue
        try:
            return validate_pattern(pattern)
        except ValidationError:
            continue
    return None


def _and_clauses(node: Node) -> list[Node]:
    if isinstance(node, Binary) and node.op == "AND":
        return _and_clauses(node.left) + _and_clauses(node.right)
    return [node]


def _clause_pattern(node: Node) -> str | None:
    if isinstance(node, Binary) and node.op == "=":
        pair = (node.left, node.right)
        for a, b in (pair, pair[::-1]):
            if a == Attr("type") and isinstance(b, Lit) and isinstance(b.value, str):
                return b.value if not set(b.value) & {"*", ">"} else None
        return None
    if isinstance(node, Like) and not node.negated and node.operand == Attr("type"):
        p = node.pattern
        if "_" in p or "\\" in p or "*" in p or ">" in p:
            return None
        if "%" not in p:
            return p
        if p.count("%") == 1 and p.endswith(".%"):
            return p[:-1] + ">"
    return None

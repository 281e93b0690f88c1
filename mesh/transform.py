"""``--transform``: reshape the data delivered to a target with a JMESPath expression.

Why JMESPath (over JSONata): it is a specified language with a compliance suite, a small
pure-Python reference implementation, and no loops, recursion, variables or user
functions, so every evaluation terminates and its cost can be bounded before it runs.
It has no I/O of any kind. The bounds, all enforced here:

- at creation: at most ``MAX_EXPRESSION`` characters, and a *growth factor* at most
  ``MAX_GROWTH``. Nothing in JMESPath can refer back to a parent value, so a result is
  built from pieces of its input (and of literals in the expression); the one way to
  multiply them is to put a value in a list or object more than once and feed that on
  (``[@, @] | [@, @] | ...`` doubles each time). ``growth`` is an upper bound on that
  factor computed from the syntax tree: a node's factor is the larger of the sum and the
  product of its children's (sum for side by side, product for one after the other).
- per event, before evaluating: ``growth * (input size + expression size)`` at most
  ``MAX_WORK`` bytes, else the event is dead-lettered unevaluated (the bound on how much
  data the evaluation can touch, so on its time and memory);
- while evaluating: at most ``MAX_STEPS`` node visits (projections and ``map`` visit their
  right side once per element);
- after: the result, as JSON, at most ``MAX_OUTPUT`` bytes.

An expression that fails at run time (a type error such as ``abs('x')``) or passes a
bound raises TransformFailed; delivering services dead-letter the event with its reason.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jmespath
from jmespath import exceptions as jp_errors
from jmespath.visitor import Options, TreeInterpreter

from mesh.errors import ExpressionError, MeshError

MAX_EXPRESSION = 2048
MAX_GROWTH = 1000
MAX_WORK = 64 * 1024 * 1024
MAX_STEPS = 1_000_000
MAX_OUTPUT = 1024 * 1024


class TransformFailed(MeshError):
    """A transform that raised or passed a bound for one event (the reason is the text)."""


def growth(node: Any) -> int:
    """An upper bound on how many times the result can repeat its input (see the module)."""
    children = [c for c in node.get("children", ()) if isinstance(c, dict)]
    if not children:
        return 1
    factors = [growth(c) for c in children]
    product = 1
    for f in factors:
        product = min(product * f, 2**62)
    return max(sum(factors), product)


class _Counting(TreeInterpreter):
    """The reference interpreter, counting node visits against a budget (``visit`` is
    the base class's, inlined with the count: it runs once per node)."""

    def __init__(self) -> None:
        super().__init__(Options())
        self.left = 0
        self._methods: dict[str, Any] = {}

    def visit(self, node: Any, *args: Any, **kwargs: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise TransformFailed("transform stopped: more than the allowed evaluation steps")
        kind = node["type"]
        method: Any = self._methods.get(kind)
        if method is None:
            method = getattr(self, "visit_" + kind, self.default_visit)
            self._methods[kind] = method
        return method(node, *args, **kwargs)


class Transform:
    """A compiled transform; ``apply`` is pure (the input is never changed)."""

    __slots__ = ("_interpreter", "_parsed", "growth", "text")

    def __init__(self, text: str) -> None:
        if not text.strip():
            raise ExpressionError("empty transform expression")
        if len(text) > MAX_EXPRESSION:
            raise ExpressionError(f"transform longer than {MAX_EXPRESSION} characters")
        try:
            self._parsed = jmespath.compile(text)
        except jp_errors.JMESPathError as exc:
            reason = " ".join(str(exc).split())
            raise ExpressionError(f"JMESPath: {reason}") from None
        self.text = text
        # One interpreter per transform, reused: apply runs to the end without yielding.
        self._interpreter = _Counting()
        self.growth = growth(self._parsed.parsed)
        if self.growth > MAX_GROWTH:
            raise ExpressionError(
                f"transform can repeat its input up to {self.growth} times"
                f" (at most {MAX_GROWTH}): it repeats a value and feeds it on too often"
            )

    def apply(self, data: Any, size: int, *, steps: int = MAX_STEPS) -> Any:
        """The transformed data; ``size`` is the size of the input's encoding in bytes."""
        return self.run(data, size, steps=steps)[0]

    def run(self, data: Any, size: int, *, steps: int = MAX_STEPS) -> tuple[Any, int]:
        """The transformed data and the size of its JSON in bytes (the next transform's
        ``size`` when transforms are chained)."""
        work = self.growth * (size + len(self.text))
        if work > MAX_WORK:
            raise TransformFailed(
                f"transform not run: growth {self.growth} x {size} bytes of input"
                f" exceeds the {MAX_WORK} byte work bound"
            )
        try:
            self._interpreter.left = steps
            result = self._interpreter.visit(self._parsed.parsed, data)
        except TransformFailed:
            raise
        except jp_errors.JMESPathError as exc:
            raise TransformFailed(f"transform failed: {' '.join(str(exc).split())}") from None
        except (TypeError, ValueError, ArithmeticError, RecursionError, MemoryError) as exc:
            raise TransformFailed(f"transform failed: {type(exc).__name__}: {exc}") from None
        try:
            # ASCII JSON: its length in characters is its size in bytes, and at least
            # the UTF-8 size receivers get.
            out = len(json.dumps(result, separators=(",", ":"), default=str))
        except (TypeError, ValueError, RecursionError) as exc:
            raise TransformFailed(f"transform result is not JSON: {exc}") from None
        if out > MAX_OUTPUT:
            raise TransformFailed(
                f"transform result of {out} bytes exceeds the {MAX_OUTPUT} byte bound"
            )
        return result, out


@lru_cache(maxsize=512)
def compile_transform(text: str) -> Transform:
    """The compiled transform for ``text`` (cached); raises ExpressionError."""
    return Transform(text)

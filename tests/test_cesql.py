"""CESQL: the conformance table (tests/cesql_cases.py) evaluated directly, and properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.cesql import Kind, compile_expression
from mesh.errors import ExpressionError
from tests.cesql_cases import BASE, CASES

KINDS = {
    "math": Kind.MATH,
    "cast": Kind.CAST,
    "missingAttribute": Kind.MISSING_ATTRIBUTE,
    "functionEvaluation": Kind.FUNCTION,
}


class DictInput:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = {**BASE, **attrs}
        self.data = self.attrs.pop("data", None)

    def attribute(self, name: str) -> Any:
        return self.attrs.get(name)


@pytest.mark.parametrize(("text", "attrs", "result", "error"), CASES, ids=[c[0] for c in CASES])
def test_conformance(text: str, attrs: dict[str, Any], result: Any, error: str | None) -> None:
    if error in ("parse", "compile"):
        with pytest.raises(ExpressionError) as info:
            compile_expression(text)
        assert "\n" not in str(info.value)
        if error == "parse":
            assert "ParseError" in str(info.value) or "empty" in str(info.value)
        return
    value, errors = compile_expression(text).evaluate(DictInput(attrs))
    assert value == result and type(value) is type(result)
    if error is None:
        assert errors == []
    else:
        assert errors and errors[0].kind is KINDS[error], errors


def test_filter_passes_only_true_without_errors() -> None:
    expr = compile_expression("n + 0 > 1 OR TRUE", condition=True)
    assert expr.matches(DictInput({"n": "5"})) == (True, [])
    passed, errors = compile_expression("true AND (1 = 1 / z)").matches(DictInput({"z": "0"}))
    assert not passed and errors[0].kind is Kind.MATH
    # a String-valued identifier is not a Boolean: it does not pass
    assert compile_expression("subject").matches(DictInput({"subject": "true"}))[0] is False
    assert compile_expression("flag").matches(DictInput({"flag": True}))[0] is True


@pytest.mark.parametrize("text", ["1 + 1", "'abc'", "CONCAT('a')", "-type"])
def test_a_filter_must_be_a_condition(text: str) -> None:
    with pytest.raises(ExpressionError, match="must be a condition"):
        compile_expression(text, condition=True)


def test_too_long_or_too_deep_is_refused() -> None:
    with pytest.raises(ExpressionError):
        compile_expression("a = 1 AND " * 500 + "TRUE")
    with pytest.raises(ExpressionError):
        compile_expression("NOT " * 1000 + "TRUE")


_ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@settings(max_examples=200, deadline=None)
@given(a=_ints, b=_ints.filter(lambda n: n != 0))
def test_division_truncates_and_remainder_follows_dividend(a: int, b: int) -> None:
    inp = DictInput({"a": str(a), "b": str(b)})
    q, qe = compile_expression("a / b").evaluate(inp)
    r, re_ = compile_expression("a % b").evaluate(inp)
    if qe:  # -2**31 / -1 is the one overflow
        assert (a, b) == (-(2**31), -1)
        return
    assert not re_
    assert q == int(a / b) if abs(a) < 2**52 else True
    assert q * b + r == a and (r == 0 or (r < 0) == (a < 0)) and abs(r) < abs(b)


@settings(max_examples=200, deadline=None)
@given(s=st.text(alphabet="ab%_.", max_size=8), t=st.text(alphabet="ab%_.", max_size=8))
def test_like_without_wildcards_is_equality(s: str, t: str) -> None:
    """A pattern whose % and _ are all escaped matches exactly the text it spells."""
    pattern = t.replace("%", "\\%").replace("_", "\\_").replace("'", "''")
    value = s.replace("'", "''")
    got, errors = compile_expression(f"'{value}' LIKE '{pattern}'").evaluate(DictInput({}))
    assert not errors
    assert got == (s == t)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("type = 'order.created'", "order.created"),
        ("'x.y' = type AND data.n > 1", "x.y"),
        ("data.n > 1 AND TYPE LIKE 'order.%'", "order.>"),
        ("type LIKE 'order.created'", "order.created"),
        ("type LIKE 'ord%'", None),  # 'ord%' also matches 'order.x': no whole-token form
        ("type LIKE 'a_b'", None),
        ("type = 'a' OR data.n = 1", None),  # not implied: OR
        ("NOT type = 'a'", None),
        ("type <> 'a'", None),
        ("type = 'a..b'", None),  # not a valid type: no narrowing
        ("type = ", None),
    ],
)
def test_type_pattern_only_when_implied(text: str, pattern: str | None) -> None:
    from mesh.cesql import type_pattern

    assert type_pattern(text) == pattern

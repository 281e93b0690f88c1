"""JMESPath transforms (mesh/transform.py): results, and every bound that stops one."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ExpressionError
from mesh.transform import MAX_GROWTH, MAX_WORK, Transform, TransformFailed, compile_transform

DATA = {"order": {"id": 7, "lines": [{"sku": "a", "q": 2}, {"sku": "b", "q": 1}]}, "total": 9}


@pytest.mark.parametrize(
    ("text", "out"),
    [
        ("{id: order.id, total: total}", {"id": 7, "total": 9}),
        ("order.lines[*].sku", ["a", "b"]),
        ("{n: length(order.lines), q: sum(order.lines[*].q)}", {"n": 2, "q": 3}),
        ("{payload: @, v: `2`}", {"payload": DATA, "v": 2}),
        ("order.lines[?q > `1`].sku | [0]", "a"),
        ("missing.field", None),
    ],
)
def test_results(text: str, out: object) -> None:
    before = copy.deepcopy(DATA)
    assert compile_transform(text).apply(DATA, 100) == out
    assert before == DATA  # the input is never changed


def test_growth_is_bounded_at_creation() -> None:
    doubling = "[@, @]"
    assert Transform("|".join([doubling] * 9)).growth <= MAX_GROWTH
    with pytest.raises(ExpressionError, match="repeat its input"):
        Transform("|".join([doubling] * 10))
    with pytest.raises(ExpressionError, match="JMESPath"):
        Transform("a.[")
    with pytest.raises(ExpressionError, match="longer"):
        Transform("a" * 3000)


def test_work_bound_refuses_before_evaluating() -> None:
    t = Transform("|".join(["[@, @]"] * 9))
    size = MAX_WORK // t.growth + 1
    with pytest.raises(TransformFailed, match="work bound"):
        t.apply("x", size)
    assert t.apply("x", 10) is not None  # the same transform on a small event runs


def test_step_bound_stops_a_long_evaluation() -> None:
    t = Transform("items[*].[@, @]")
    data = {"items": list(range(1000))}
    assert len(t.apply(data, 10)) == 1000
    with pytest.raises(TransformFailed, match="evaluation steps"):
        t.apply(data, 10, steps=500)
    # the interpreter is reused: a bound hit once does not stick
    assert len(t.apply(data, 10)) == 1000


def test_output_bound() -> None:
    t = Transform("[p, p, p, p, p, p]")
    with pytest.raises(TransformFailed, match="byte bound"):
        t.apply({"p": "y" * 200_000}, 200_000)


def test_runtime_type_errors_are_failures_not_crashes() -> None:
    for text, data in [("abs(v)", {"v": "x"}), ("sort(v)", {"v": [1, "a"]}), ("keys(v)", {"v": 1})]:
        with pytest.raises(TransformFailed, match="transform failed"):
            Transform(text).apply(data, 10)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-100, 100) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(data=_json)
def test_any_json_in_gives_json_out_or_a_failure(data: object) -> None:
    """Whatever the data, a transform returns JSON-serialisable data or TransformFailed."""
    for text in ("@", "[@, keys(@)]", "{a: @, b: length(@)}", "values(@)[0]"):
        with contextlib.suppress(TransformFailed):
            json.dumps(Transform(text).apply(data, len(json.dumps(data))))

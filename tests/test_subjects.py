"""The subject grammar: names, types, patterns, matching and filter reduction."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidName, ValidationError
from mesh.subjects import (
    Subjects,
    collide,
    reduce_filters,
    subject_matches,
    subsumes,
    validate_name,
    validate_pattern,
    validate_type,
)

# Names --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "billing", "shop-eu_2", "0day", "a" * 64])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "A", "Billing", "-x", "_x", "a.b", "a*", "a>", "a b", "a" * 65, "é", "a\n", "a/b"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName, match="invalid target name"):
        validate_name(name, "target name")


def test_invalid_name_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_name("No")


def test_non_string_name() -> None:
    with pytest.raises(InvalidName):
        validate_name(None)  # type: ignore[arg-type]


# Types and patterns -------------------------------------------------------


@pytest.mark.parametrize("t", ["order", "order.created", "Order.Created-v2", "a_b.c-d.e"])
def test_valid_types(t: str) -> None:
    assert validate_type(t) == t


@pytest.mark.parametrize(
    "t",
    ["", ".", "order.", ".order", "order..created", "order.*", "order.>", "a b", "x\n", "x" * 256],
)
def test_invalid_types(t: str) -> None:
    with pytest.raises(ValidationError):
        validate_type(t)


@pytest.mark.parametrize("p", ["order", "order.*", "*", ">", "order.>", "*.created", "a.*.>"])
def test_valid_patterns(p: str) -> None:
    assert validate_pattern(p) == p


@pytest.mark.parametrize("p", ["", "order.>.x", ">.a", "order.", "a..b", "a b", "a.**", "a.>>"])
def test_invalid_patterns(p: str) -> None:
    with pytest.raises(ValidationError):
        validate_pattern(p)


# Matching -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("order.created", "order.created", True),
        ("order.*", "order.created", True),
        ("order.*", "order", False),
        ("order.*", "order.created.v2", False),
        ("order.>", "order.created.v2", True),
        ("order.>", "order", False),
        (">", "anything.at.all", True),
        ("*", "one", True),
        ("*", "one.two", False),
        ("*.created", "user.created", True),
        ("*.created", "user.deleted", False),
    ],
)
def test_subject_matches(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


# Property tests: the pattern algebra agrees with brute-force matching over a
# small universe of concrete subjects.

TOKENS = ["a", "b", "c"]
UNIVERSE = [".".join(parts) for n in range(1, 4) for parts in itertools.product(TOKENS, repeat=n)]
pattern_tokens = st.sampled_from([*TOKENS, "*"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    toks = draw(st.lists(pattern_tokens, min_size=1, max_size=3))
    if draw(st.booleans()) and len(toks) < 3:
        toks.append(">")
    return ".".join(toks)


def matched(pattern: str) -> set[str]:
    return {s for s in UNIVERSE if subject_matches(pattern, s)}


@settings(max_examples=300, deadline=None)
@given(patterns(), patterns())
def test_collide_agrees_with_matching(a: str, b: str) -> None:
    # The universe has subjects up to 3 tokens and patterns need at most 3: an overlap
    # of two patterns always has a witness of at most 3 tokens.
    assert collide(a, b) == bool(matched(a) & matched(b))
    assert collide(a, b) == collide(b, a)


@settings(max_examples=300, deadline=None)
@given(patterns(), patterns())
def test_subsumes_is_sound(wide: str, narrow: str) -> None:
    if subsumes(wide, narrow):
        assert matched(narrow) <= matched(wide)
    if wide == narrow:
        assert subsumes(wide, narrow)


@settings(max_examples=300, deadline=None)
@given(st.lists(patterns(), min_size=1, max_size=6))
def test_reduce_filters_covers_and_never_overlaps(pats: list[str]) -> None:
    reduced = reduce_filters(pats)
    # Nothing wanted is lost.
    wanted = set().union(*(matched(p) for p in pats))
    covered = set().union(*(matched(p) for p in reduced))
    assert wanted <= covered
    # JetStream's rule: no two filter subjects overlap.
    for x, y in itertools.combinations(reduced, 2):
        assert not collide(x, y), (x, y, reduced)
    assert reduced == sorted(set(reduced))


def test_reduce_filters_examples() -> None:
    assert reduce_filters(["mesh.evt.s.>", "mesh.evt.s.order.*", "mesh.replay.t.>"]) == [
        "mesh.evt.s.>",
        "mesh.replay.t.>",
    ]
    # Partial overlap widens to the common prefix.
    assert reduce_filters(["mesh.evt.s.order.*", "mesh.evt.s.*.created"]) == ["mesh.evt.s.>"]
    # Disjoint sources stay apart.
    assert reduce_filters(["mesh.evt.a.>", "mesh.evt.b.x", "mesh.evt.b.x"]) == [
        "mesh.evt.a.>",
        "mesh.evt.b.x",
    ]


# Subject builders ---------------------------------------------------------


def test_subject_builders() -> None:
    s = Subjects("mesh")
    assert s.evt("shop", "order.created") == "mesh.evt.shop.order.created"
    assert s.evt_filter("shop") == "mesh.evt.shop.>"
    assert s.evt_filter("shop", "order.*") == "mesh.evt.shop.order.*"
    assert s.replay("t", "shop", "x") == "mesh.replay.t.shop.x"
    assert s.rpc("t", "get.price") == "mesh.rpc.t.get.price"
    assert s.dlq("t") == "mesh.dlq.t"
    assert s.delivery("t") == "mesh.sys.delivery.t"
    assert s.health("sink", "i1") == "mesh.sys.health.sink.i1"


def test_parse_event() -> None:
    s = Subjects("mesh")
    assert s.parse_event("mesh.evt.shop.order.created") == ("shop", "order.created", None)
    assert s.parse_event("mesh.replay.billing.shop.order.created") == (
        "shop",
        "order.created",
        "billing",
    )
    dotted = Subjects("acme.mesh")
    assert dotted.parse_event("acme.mesh.evt.shop.x") == ("shop", "x", None)
    for bad in ["mesh.evt.shop", "other.evt.shop.x", "mesh.rpc.t.x", "mesh.replay.t.shop"]:
        with pytest.raises(ValidationError):
            s.parse_event(bad)

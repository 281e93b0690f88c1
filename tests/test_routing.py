"""The route check (mesh/routing.py) as a pure function of rules and an event: filters,
transforms, and the property that a target gets exactly what its rules accept."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.envelope import Event
from mesh.registry import Rule
from mesh.routing import EventInput, RouteCache
from mesh.transform import MAX_OUTPUT
from tests.support.filtergen import Ev, accepted, random_event, random_filter


class Rules:
    """A registry stand-in for the cache (pure logic: no broker involved)."""

    def __init__(self, rules: list[Rule], own: str | None = None) -> None:
        self.rules, self.own, self.rev = rules, own, 1

    async def revision(self) -> int:
        return self.rev

    async def recent_revision(self, max_age: float) -> int:
        return self.rev  # never stale here: the real one may lag by max_age

    async def rules_for(self, target: str) -> tuple[list[Rule], str | None]:
        return list(self.rules), self.own


def event_of(e: Ev) -> Event:
    return Event(source=e.source, type=e.type, data=e.data(), subject=e.subject)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
async def test_a_target_gets_exactly_what_its_rules_accept(seed: int) -> None:
    rng = random.Random(seed)
    f = random_filter(rng)
    rules = [Rule("a", "order.*", "p1", filter=f.text), Rule("b", "user.*", "p2")]
    cache = RouteCache(Rules(rules))  # type: ignore[arg-type]
    events = [random_event(rng, ["a", "b", "c"]) for _ in range(40)]
    for e in events:
        verdict = await cache.verdict("t", event_of(e))
        want = (e.source == "a" and e.type.startswith("order.") and accepted(f, e)) or (
            e.source == "b" and e.type.startswith("user.")
        )
        assert (verdict.event is not None) == want, (f.text, e)
        if not want:
            assert verdict.skip
            if e.source == "a" and e.type.startswith("order."):
                assert "p1" in verdict.skip and f.text[:50] in verdict.skip


async def test_first_passing_rule_picks_the_transform_then_the_targets_own() -> None:
    rules = [
        Rule("a", None, "p1", filter="data.n > 10", transform="{big: n}"),
        Rule("a", None, "p2", transform="{small: n}"),
    ]
    cache = RouteCache(Rules(rules, own="{wrapped: @}"))  # type: ignore[arg-type]
    big = await cache.verdict("t", Event(source="a", type="x", data={"n": 11}))
    small = await cache.verdict("t", Event(source="a", type="x", data={"n": 1}))
    assert big.event is not None and big.event.data == {"wrapped": {"big": 11}}
    assert small.event is not None and small.event.data == {"wrapped": {"small": 1}}
    assert big.event.datacontenttype == "application/json"


async def test_a_failing_transform_is_a_dead_letter_not_a_skip() -> None:
    cache = RouteCache(Rules([Rule("a", None, "p1", transform="abs(v)")]))  # type: ignore[arg-type]
    ok = await cache.verdict("t", Event(source="a", type="x", data={"v": -2}))
    bad = await cache.verdict("t", Event(source="a", type="x", data={"v": "x"}))
    assert ok.event is not None and ok.event.data == 2
    assert bad.event is None and bad.skip is None
    assert bad.dead is not None and "abs()" in bad.dead
    pad = "x" * 200_000
    big = await cache.verdict(
        "t",
        Event(source="a", type="x", data={"v": 1, "p": pad}),
        size=200_000,
    )
    assert big.event is not None
    cache2 = RouteCache(Rules([Rule("a", None, "p1", transform="[p, p, p, p, p, p]")]))  # type: ignore[arg-type]
    over = await cache2.verdict("t", Event(source="a", type="x", data={"p": pad}), size=200_000)
    assert over.dead is not None and str(MAX_OUTPUT) in over.dead


async def test_replays_pass_filters_but_are_still_reshaped() -> None:
    rules = [Rule("a", None, "p1", filter="data.n > 10", transform="n")]
    cache = RouteCache(Rules(rules))  # type: ignore[arg-type]
    replay = Event(source="a", type="x", data={"n": 1}, replay=True)
    verdict = await cache.verdict("t", replay)
    assert verdict.event is not None and verdict.event.data == 1


async def test_a_changed_registry_is_seen_on_a_hit_too(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Rules([Rule("a", None, "p1", filter="data.n > 10")])
    cache = RouteCache(reg)  # type: ignore[arg-type]
    ev = Event(source="a", type="x", data={"n": 5})
    assert (await cache.verdict("t", ev)).skip
    reg.rules, reg.rev = [Rule("a", None, "p2", filter="data.n > 1")], 2
    import mesh.routing

    monkeypatch.setattr(mesh.routing, "REFRESH_S", 0.0)
    assert (await cache.verdict("t", ev)).event is not None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("type", "order.created"),
        ("source", "shop"),
        ("specversion", "1.0"),
        ("subject", "s1"),
        ("time", "2026-01-02T03:04:05Z"),
        ("meshorigin", None),
        ("meshhops", 0),
        ("myext", "v"),
        ("nothere", None),
    ],
)
def test_event_input_attributes(name: str, value: Any) -> None:
    from datetime import UTC, datetime

    ev = Event(
        source="shop",
        type="order.created",
        subject="s1",
        time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        extensions={"myext": "v"},
    )
    assert EventInput(ev).attribute(name) == value


async def test_a_chained_transform_is_bounded_by_what_the_first_produced() -> None:
    """The target's transform runs on the propagation's output: its work bound counts
    that output's size, not the original event's."""
    wide = "[" + ", ".join(["@"] * 150) + "]"  # growth 150
    rules = [Rule("a", None, "p1", transform="[p, p, p, p, p]")]
    cache = RouteCache(Rules(rules, own=wide))  # type: ignore[arg-type]
    small = await cache.verdict("t", Event(source="a", type="x", data={"p": "y"}), size=10)
    assert small.event is not None and len(small.event.data) == 150
    pad = "y" * 100_000  # 100 kB in, ~500 kB after the first: 150 x that is over 64 MiB
    big = await cache.verdict("t", Event(source="a", type="x", data={"p": pad}), size=100_000)
    assert big.dead is not None and "work bound" in big.dead

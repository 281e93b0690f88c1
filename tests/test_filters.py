"""--filter and --transform through the real delivery path: a real nats-server, the real
consume feed and the real webhook egress (tests/test_cesql.py evaluates the whole
conformance table directly; here a sample of it goes through the broker)."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mesh.cesql import compile_expression
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import ExpressionError
from mesh.registry import PropagationMode
from services.egress.service import WebhookEgress
from tests.cesql_cases import CASES
from tests.conftest import add_nats_target
from tests.support.feeds import collect
from tests.support.filtergen import accepted, random_event, random_filter
from tests.support.receiver import (
    Receiver,
    add_webhook,
    dead_letters,
    delivery_records,
    eventually,
)

UNI = PropagationMode.UNIDIRECTIONAL

# Cases whose event can be published as it is: string extensions, subject, JSON data.
_CORE = {"id", "source", "type", "specversion", "time"}


def _publishable(attrs: dict[str, Any]) -> bool:
    return all(k not in _CORE and (k == "data" or isinstance(v, str)) for k, v in attrs.items())


def _condition(text: str) -> bool:
    try:
        compile_expression(text, condition=True)
    except ExpressionError:
        return False
    return True


def _sampled(i: int, text: str, attrs: dict[str, Any]) -> bool:
    """Every case that reads the event (but not its id or source, which the broker path
    sets itself), and every fourth constant one."""
    if re.search(r"\b(source|id)\b", text, re.IGNORECASE) and "EXISTS" not in text:
        return False
    return bool(attrs) or i % 4 == 0


SAMPLE = [
    c
    for i, c in enumerate(CASES)
    if c[3] not in ("parse", "compile")
    and _publishable(c[1])
    and isinstance(c[2], bool)
    and _condition(c[0])
    and _sampled(i, c[0], c[1])
]


async def _publish_case(client: MeshClient, source: str, attrs: dict[str, Any]) -> str:
    attrs = dict(attrs)
    event = client.build(
        source, "myType", attrs.pop("data", None), subject=attrs.pop("subject", None)
    )
    event.extensions.update(attrs)
    await client.publish_event(event)
    return event.id


async def test_conformance_sample_through_the_feed(client: MeshClient) -> None:
    """Each sampled case gets its own source and propagation filtered by the case's
    expression: the target receives exactly the events whose case passes (true, no error)."""
    assert len(SAMPLE) >= 15
    await add_nats_target(client, "t")
    want: set[str] = set()
    for i, (text, attrs, result, error) in enumerate(SAMPLE):
        source = f"c{i}"
        await client.add_propagation(UNI, source, ["t"], filter=text)
        event_id = await _publish_case(client, source, attrs)
        if result is True and error is None:
            want.add(event_id)
    got = await collect(client, "t", len(want), timeout=20)
    assert {e.id for e in got} == want
    records = await eventually(lambda: _skipped(client, "t", len(SAMPLE) - len(want)), timeout=10)
    assert all("filter of propagation" in r.error for r in records)


async def _skipped(client: MeshClient, target: str, n: int) -> list[Any] | None:
    recs = [r for r in await delivery_records(client, target) if r.outcome == "skipped"]
    return recs if len(recs) >= n else None


async def test_random_filters_through_the_feed(client: MeshClient) -> None:
    """The property of tests/test_routing.py once through the broker: a fixed seed, three
    filters on three propagations to three targets, events from inside and outside them."""
    rng = random.Random(20)
    filters = [random_filter(rng) for _ in range(3)]
    for i, f in enumerate(filters):
        await add_nats_target(client, f"t{i}")
        await client.add_propagation(UNI, "a", [f"t{i}"], types="order.*", filter=f.text)
    events = [random_event(rng, ["a", "b"]) for _ in range(40)]
    ids = []
    for e in events:
        ids.append(await client.publish(e.source, e.type, e.data(), subject=e.subject))
    for i, f in enumerate(filters):
        want = {
            ids[k]
            for k, e in enumerate(events)
            if e.source == "a" and e.type.startswith("order.") and accepted(f, e)
        }
        got = await collect(client, f"t{i}", len(want), timeout=15)
        assert {e.id for e in got} == want, f.text


async def test_transform_reshapes_what_the_feed_hands_out(client: MeshClient) -> None:
    await add_nats_target(client, "t")
    await client.add_propagation(
        UNI,
        "shop",
        ["t"],
        filter="type = 'order.created' AND data.total >= 100",
        transform="{id: order.id, total: total, items: length(order.items)}",
    )
    await client.publish(
        "shop", "order.created", {"order": {"id": 1, "items": [1, 2]}, "total": 150}
    )
    await client.publish("shop", "order.created", {"order": {"id": 2, "items": []}, "total": 5})
    await client.publish("shop", "order.paid", {"order": {"id": 3, "items": []}, "total": 500})
    got = await collect(client, "t", 1)
    assert [e.data for e in got] == [{"id": 1, "total": 150, "items": 2}]


@pytest.mark.parametrize(
    ("filter_", "transform"),
    [
        ("type = ", None),
        ("1 + 1", None),
        ("NOSUCH(type)", None),
        (None, "a.["),
        (None, "[@,@]|" * 12 + "@"),
    ],
)
async def test_bad_expressions_are_refused_and_never_stored(
    client: MeshClient, filter_: str | None, transform: str | None
) -> None:
    await add_nats_target(client, "t")
    with pytest.raises(ExpressionError):
        await client.add_propagation(UNI, "shop", ["t"], filter=filter_, transform=transform)
    assert await client.registry.list_propagations() == []


@pytest.fixture
async def rx() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def test_egress_filters_reshapes_and_dead_letters_failed_transforms(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    """A transform that raises (abs of a string) or passes its output bound is stopped and
    dead-lettered with the reason; the target's other events keep flowing; skipped events
    have a record naming the filter."""
    await add_webhook(
        client, "hook", rx.url, source="nobody", transform="{v: abs(v), p: [p, p, p, p, p, p]}"
    )
    prop = await client.add_propagation(UNI, "shop", ["hook"], filter="data.keep <> FALSE")
    good = [await client.publish("shop", "x", {"v": -i, "p": "", "keep": True}) for i in range(3)]
    raises = await client.publish("shop", "x", {"v": "nan", "p": "", "keep": True})
    huge = await client.publish("shop", "x", {"v": 1, "p": "y" * 200_000, "keep": True})
    skipped = await client.publish("shop", "x", {"v": 1, "p": "", "keep": False})
    after = [await client.publish("shop", "x", {"v": 7, "p": "q", "keep": True})]
    await rx.wait_for(4)
    assert sorted(r.json()["data"]["v"] for r in rx.requests) == [0, 1, 2, 7]
    assert set(rx.ids()) == set(good + after)
    dead = await eventually(lambda: _at_least(dead_letters(client, "hook"), 2), timeout=10)
    reasons = {d.headers.get("ce-id"): d.error for d in dead}
    assert "abs()" in reasons[raises]
    assert "byte bound" in reasons[huge]
    records = await eventually(lambda: _skipped(client, "hook", 1), timeout=10)
    assert [r.event_id for r in records] == [skipped]
    assert prop.id in records[0].error and "is false" in records[0].error


async def _at_least(coro: Any, n: int) -> list[Any] | None:
    found = await coro
    return found if len(found) >= n else None


async def test_cli_filter_and_transform(client: MeshClient, settings: Settings) -> None:
    """Both flags through the CLI, checked at creation; refusals are one line, exit 1."""
    from tests.conftest import env_for
    from tests.support.cli import ok, one_line_error
    from tests.support.inproc import mesh_inproc as mesh  # what they say, not the process

    env = env_for(settings)
    await add_nats_target(client, "billing")
    uni = ["propagate", "unidirectional", "--source", "shop", "--target", "billing"]
    added, shaped = await asyncio.gather(
        mesh(env, *uni, "--filter", "data.total > 100", "--transform", "{t: total}"),
        mesh(env, "target", "add", "shaped", "--kind", "nats", "--transform", "{total: total}"),
    )
    assert "filter: data.total > 100" in ok(added).stdout
    ok(shaped)
    refusals = [
        (["--filter", "data.total >"], ["ParseError", "end of expression"]),
        (["--filter", "LENGTH(type)"], ["must be a condition", "Integer"]),
        (["--filter", "ABS(1, 2) = 1"], ["MissingFunctionError"]),
        (["--transform", "{a: }"], ["JMESPath"]),
    ]
    *procs, bad_target, listed, table = await asyncio.gather(
        *(mesh(env, *uni, *extra) for extra, _ in refusals),
        mesh(env, "target", "add", "x", "--kind", "nats", "--transform", "["),
        mesh(env, "propagation", "list", "--json"),
        mesh(env, "propagation", "list", width=300),
    )
    for (_, needles), proc in zip(refusals, procs, strict=True):
        one_line_error(proc, *needles)
    one_line_error(bad_target, "JMESPath")
    docs = json.loads(ok(listed).stdout)
    assert [(d["filter"], d["transform"]) for d in docs] == [("data.total > 100", "{t: total}")]
    assert "data.total > 100" in ok(table).stdout and "{t: total}" in table.stdout
    assert (await client.registry.get_target("shaped")).transform == "{total: total}"
    assert len(await client.registry.list_propagations()) == 1


async def test_bridge_feed_filters_reshapes_and_dead_letters(
    client: MeshClient, settings: Settings
) -> None:
    """The bridge's feed: filtered-out events are skipped (acked, recorded), a failing
    transform is dead-lettered, the rest arrive reshaped."""
    import aiohttp

    from mesh.registry import Target, TargetKind
    from services.bridge.service import Bridge, BridgeOptions
    from tests.test_bridge import TEST_OPTIONS, connect, recv_events, token

    await client.add_target(Target(name="screens", kind=TargetKind.STREAM))
    await client.add_propagation(
        UNI, "wire", ["screens"], filter="data.n >= 2", transform="{m: abs(n)}"
    )
    bridge = Bridge(settings, options=BridgeOptions(**TEST_OPTIONS))
    await bridge.start()
    try:
        ids = [await client.publish("wire", "headline", {"n": n}) for n in (0, 1, 2, 3)]
        bad = await client.publish("wire", "headline", {"n": "7"})  # >= 2 as CESQL, not abs()
        async with aiohttp.ClientSession() as http:
            ws = await connect(http, bridge, token(settings))
            frames = await recv_events(ws, 2)
            assert [(f["id"], f["data"]) for f in frames] == [
                (ids[2], {"m": 2}),
                (ids[3], {"m": 3}),
            ]
            await ws.send_json({"ack": [f["seq"] for f in frames]})
            dead = await eventually(lambda: _at_least(dead_letters(client, "screens"), 1))
            assert dead[0].headers.get("ce-id") == bad and "abs()" in dead[0].error
            await ws.close()
        skipped = await eventually(lambda: _skipped(client, "screens", 2))
        assert {r.event_id for r in skipped} == set(ids[:2])
    finally:
        await bridge.stop()


async def test_a_filter_naming_one_type_narrows_the_consumer_on_the_server(
    client: MeshClient,
) -> None:
    """`type = 'x'` (a top-level AND clause) becomes the consumer's subject filter: the
    server never hands the target other types; the rest of the filter runs in-process."""
    from tests.support.feeds import queued

    await add_nats_target(client, "t")
    await client.add_propagation(UNI, "shop", ["t"], filter="data.n > 0 AND type = 'order.created'")
    info = await client.js.consumer_info(client.names.events, "deliver-t")
    subjects = set(info.config.filter_subjects or [info.config.filter_subject])
    assert "mesh.evt.shop.order.created" in subjects
    assert not any(s.startswith("mesh.evt.shop.>") for s in subjects)
    await client.publish("shop", "order.paid", {"n": 1})
    await client.publish("shop", "user.created", {"n": 1})
    assert await queued(client, "t") == 0
    kept = await client.publish("shop", "order.created", {"n": 1})
    await client.publish("shop", "order.created", {"n": 0})
    assert [e.id for e in await collect(client, "t", 1)] == [kept]

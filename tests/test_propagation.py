"""The four propagation modes against a real nats-server: who gets what, and live changes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh.client import MeshClient, Reply
from mesh.config import Settings
from mesh.envelope import Event
from mesh.registry import PropagationMode
from tests.conftest import add_nats_target
from tests.support.feeds import collect, eventually, queued, stream_count

UNI = PropagationMode.UNIDIRECTIONAL
BI = PropagationMode.BIDIRECTIONAL
MULTI = PropagationMode.MULTICAST
BROAD = PropagationMode.BROADCAST


async def targets(client: MeshClient, *names: str) -> None:
    for n in names:
        await add_nats_target(client, n)


async def publish_n(client: MeshClient, source: str, event_type: str, n: int) -> list[str]:
    return [await client.publish(source, event_type, {"i": i}) for i in range(n)]


async def test_unidirectional_delivers_to_exactly_its_target(client: MeshClient) -> None:
    await targets(client, "billing", "audit", "crm")
    await client.add_propagation(UNI, "shop", ["billing"])
    ids = await publish_n(client, "shop", "order.created", 3)
    got = await collect(client, "billing", 3)
    assert [e.id for e in got] == ids
    assert [e.data for e in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert all(e.source == "shop" and e.type == "order.created" for e in got)
    for other in ("audit", "crm"):
        assert await queued(client, other) == 0
        assert await collect(client, other, 0) == []
    assert await queued(client, "billing") == 0


async def test_multicast_delivers_to_exactly_the_listed_targets(client: MeshClient) -> None:
    await targets(client, "billing", "audit", "crm")
    await client.add_propagation(MULTI, "shop", ["billing", "audit"])
    ids = await publish_n(client, "shop", "order.created", 2)
    # Stored once, fanned out by the server.
    assert await stream_count(client) == 2
    for t in ("billing", "audit"):
        assert [e.id for e in await collect(client, t, 2)] == ids
    assert await queued(client, "crm") == 0
    assert await collect(client, "crm", 0) == []


async def test_broadcast_reaches_every_target_including_later_ones(client: MeshClient) -> None:
    await targets(client, "a", "b", "ops")
    await client.add_propagation(BROAD, "ops")
    await add_nats_target(client, "late")  # registered after the propagation
    [eid] = await publish_n(client, "ops", "alert.fired", 1)
    for t in ("a", "b", "late"):
        assert [e.id for e in await collect(client, t, 1)] == [eid], t
    # The source itself, also a target, does not hear its own broadcast.
    assert await queued(client, "ops") == 0


async def test_bidirectional_events_both_ways_without_echo(client: MeshClient) -> None:
    await targets(client, "shop", "crm")
    await client.add_propagation(BI, "shop", ["crm"])

    [to_crm] = await publish_n(client, "shop", "order.created", 1)
    [at_crm] = await collect(client, "crm", 1)
    assert at_crm.id == to_crm

    # crm re-publishes what it received, caused by it: shop must not get its own event back.
    echo = await client.publish("crm", "order.seen", {"seen": at_crm.id}, cause=at_crm)
    # A fresh event from crm does reach shop.
    fresh = await client.publish("crm", "customer.updated", {"c": 1})
    got = await collect(client, "shop", 1)
    assert [e.id for e in got] == [fresh]
    assert echo not in {e.id for e in got}

    # The echo was stored, then skipped for shop with a record saying why.
    async def skipped_recorded() -> bool:
        info = await client.js.stream_info(
            client.names.sys, subjects_filter=client.subjects.delivery("shop")
        )
        return bool(info.state.messages)

    await eventually(skipped_recorded)
    assert await queued(client, "shop") == 0
    # And the causal chain is carried: origin shop, one hop.
    raw = await client.js.get_msg(client.names.events, subject="mesh.evt.crm.order.seen")
    assert raw.headers is not None
    assert raw.headers["ce-meshorigin"] == "shop"
    assert raw.headers["ce-meshhops"] == "1"


async def test_bidirectional_requests_both_ways(client: MeshClient) -> None:
    await targets(client, "shop", "crm")
    await client.add_propagation(BI, "shop", ["crm"])
    seen: list[Event] = []

    async def crm_answers(e: Event) -> Any:
        seen.append(e)
        return {"price": e.data["qty"] * 3, "asked_by": e.source}

    async def shop_answers(e: Event) -> Any:
        seen.append(e)
        if e.type == "stock.missing":
            return Reply(status=404, data={"error": "no such item"})
        return {"stock": 5}

    sub_crm = await client.serve_requests("crm", crm_answers)
    sub_shop = await client.serve_requests("shop", shop_answers)
    try:
        r1 = await client.request("shop", "crm", "price.get", {"qty": 2}, timeout=5)
        assert (r1.status, r1.data) == (200, {"price": 6, "asked_by": "shop"})
        r2 = await client.request("crm", "shop", "stock.get", {"sku": "x"}, timeout=5)
        assert (r2.status, r2.data) == (200, {"stock": 5})
        r3 = await client.request("crm", "shop", "stock.missing", None, timeout=5)
        assert (r3.status, r3.ok, r3.data) == (404, False, {"error": "no such item"})
        assert [(e.source, e.type) for e in seen] == [
            ("shop", "price.get"),
            ("crm", "stock.get"),
            ("crm", "stock.missing"),
        ]
    finally:
        await sub_crm.unsubscribe()
        await sub_shop.unsubscribe()


async def test_type_pattern_narrows_a_propagation(client: MeshClient) -> None:
    await targets(client, "billing")
    await client.add_propagation(UNI, "shop", ["billing"], types="order.*")
    wanted = await client.publish("shop", "order.created", 1)
    await client.publish("shop", "user.created", 2)
    await client.publish("shop", "order.created.v2", 3)
    assert [e.id for e in await collect(client, "billing", 1)] == [wanted]
    assert await queued(client, "billing") == 0


async def test_overlapping_patterns_are_merged_and_rechecked(client: MeshClient) -> None:
    """order.* and *.created overlap: the consumer filter widens, delivery re-checks types."""
    await targets(client, "billing")
    await client.add_propagation(UNI, "shop", ["billing"], types="order.*")
    await client.add_propagation(MULTI, "shop", ["billing"], types="*.created")
    info = await client.js.consumer_info(client.names.events, "deliver-billing")
    assert sorted(info.config.filter_subjects or []) == ["mesh.evt.shop.>", "mesh.replay.billing.>"]
    expect = [
        await client.publish("shop", "order.paid", 1),
        await client.publish("shop", "user.created", 2),
    ]
    await client.publish("shop", "user.deleted", 3)  # matches neither pattern
    expect.append(await client.publish("shop", "order.created", 4))
    assert [e.id for e in await collect(client, "billing", 3)] == expect


async def test_removing_a_propagation_stops_delivery(client: MeshClient) -> None:
    await targets(client, "billing")
    prop = await client.add_propagation(UNI, "shop", ["billing"])
    before = await client.publish("shop", "order.created", 1)
    assert [e.id for e in await collect(client, "billing", 1)] == [before]
    await client.remove_propagation(prop.id)
    await client.publish("shop", "order.created", 2)
    assert await queued(client, "billing") == 0
    assert await collect(client, "billing", 0) == []
    assert await client.registry.list_propagations() == []
    # Not delivered, but kept: the event is in the stream (for the sink, for replay).
    assert await stream_count(client) == 2


async def test_adding_a_propagation_reaches_a_running_consumer(client: MeshClient) -> None:
    await targets(client, "billing")
    await client.add_propagation(UNI, "shop", ["billing"])
    got: list[Event] = []
    stop = asyncio.Event()

    async def run() -> None:
        async for d in client.consume("billing", batch=10, expires=0.25, stop=stop):
            got.append(d.event)
            await d.ack()

    loop_task = asyncio.create_task(run())
    try:
        first = await client.publish("shop", "order.created", 1)
        await eventually(lambda: _has(got, first))
        # The running loop has just looked at its routes; the new one must count at once.
        await client.add_propagation(UNI, "crm", ["billing"])
        second = await client.publish("crm", "customer.updated", 2)
        await eventually(lambda: _has(got, second))
        assert [e.id for e in got] == [first, second]
    finally:
        stop.set()
        await asyncio.wait_for(loop_task, 10)


async def _has(events: list[Event], event_id: str) -> bool:
    return any(e.id == event_id for e in events)


async def test_removing_a_target_removes_its_consumer_and_propagations(
    client: MeshClient,
) -> None:
    await targets(client, "billing", "audit")
    await client.add_propagation(UNI, "shop", ["billing"])
    await client.add_propagation(MULTI, "shop", ["billing", "audit"])
    await client.add_propagation(BROAD, "ops")
    # billing as a *source* needs no registration: these stay when its inbox goes.
    await client.add_propagation(UNI, "billing", ["audit"])
    await client.add_propagation(BROAD, "billing")
    removed = await client.remove_target("billing")
    assert len(removed) == 1
    props = await client.registry.list_propagations()
    assert sorted((p.mode, p.source, tuple(p.targets)) for p in props) == [
        (BROAD, "billing", ()),
        (BROAD, "ops", ()),
        (MULTI, "shop", ("audit",)),
        (UNI, "billing", ("audit",)),
    ]
    await client.publish("billing", "invoice.sent", 1)
    assert len(await collect(client, "audit", 1)) == 1
    names = [n async for n in client.provisioner._deliver_consumers()]
    assert names == ["deliver-audit"]
    # The name can be registered again, fresh.
    await add_nats_target(client, "billing")
    await client.publish("ops", "alert", 1)
    assert len(await collect(client, "billing", 1)) == 1


async def test_over_the_hop_limit_is_skipped(client: MeshClient) -> None:
    """A message claiming too many hops (a loop through other systems) is not delivered."""
    await targets(client, "billing")
    await client.add_propagation(UNI, "shop", ["billing"])
    headers = {
        "Nats-Msg-Id": "hoppy",
        "ce-specversion": "1.0",
        "ce-id": "hoppy",
        "ce-source": "shop",
        "ce-type": "x",
        "ce-datacontenttype": "application/json",
        "ce-meshorigin": "elsewhere",
        "ce-meshhops": str(client.settings.max_hops + 1),
    }
    await client.js.publish("mesh.evt.shop.x", b"1", headers=headers)
    ok = await client.publish("shop", "x", 2)
    assert [e.id for e in await collect(client, "billing", 1)] == [ok]


async def test_a_stale_reconcile_does_not_undo_a_newer_one(
    client: MeshClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service reconciling a consumer (it found it missing) read the registry just
    before a propagation was added elsewhere, whose own reconcile then applied first:
    the stale write must not leave the target without the new filters. (Seen as a
    freshly added target that received nothing, under load.)"""
    await targets(client, "billing")
    target = await client.registry.get_target("billing")
    read_routes = client.registry.routes_for
    changed = False

    async def stale_read(name: str) -> list[tuple[str, str | None]]:
        nonlocal changed
        routes = await read_routes(name)
        if not changed:
            changed = True
            async with MeshClient(settings, name="elsewhere") as other:
                await other.add_propagation(UNI, "shop", ["billing"])  # writes, reconciles
        return routes

    monkeypatch.setattr(client.registry, "routes_for", stale_read)
    await client.provisioner.reconcile_target(target)
    assert changed
    event_id = await client.publish("shop", "order.created", 1)
    assert [e.id for e in await collect(client, "billing", 1)] == [event_id]

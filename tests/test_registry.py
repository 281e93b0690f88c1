"""Routing rules (pure) and the registry in a real KV bucket."""

from __future__ import annotations

import asyncio

import pytest

from mesh._nats.buckets import read
from mesh.broker import EmbeddedBroker
from mesh.client import MeshClient
from mesh.errors import Conflict, InvalidName, NotFound, ValidationError
from mesh.registry import (
    Propagation,
    PropagationMode,
    Target,
    TargetKind,
    compute_routes,
    route_accepts,
)
from mesh.streams import ack_wait_for, filters_for
from mesh.subjects import Subjects
from tests.conftest import add_nats_target

UNI = PropagationMode.UNIDIRECTIONAL
BI = PropagationMode.BIDIRECTIONAL
MULTI = PropagationMode.MULTICAST
BROAD = PropagationMode.BROADCAST
ALL = {"a", "b", "c", "shop"}


def P(mode: PropagationMode, source: str, *targets: str, types: str | None = None) -> Propagation:
    return Propagation(mode=mode, source=source, targets=list(targets), types=types)


# compute_routes -----------------------------------------------------------


def test_unidirectional_routes() -> None:
    props = [P(UNI, "shop", "a")]
    assert compute_routes("a", props, ALL) == [("shop", None)]
    assert compute_routes("b", props, ALL) == []
    assert compute_routes("shop", props, ALL) == []


def test_multicast_routes() -> None:
    props = [P(MULTI, "shop", "a", "b", types="order.*")]
    assert compute_routes("a", props, ALL) == [("shop", "order.*")]
    assert compute_routes("b", props, ALL) == [("shop", "order.*")]
    assert compute_routes("c", props, ALL) == []


def test_broadcast_routes_every_registered_target_but_the_source() -> None:
    props = [P(BROAD, "shop")]
    for t in ("a", "b", "c"):
        assert compute_routes(t, props, ALL) == [("shop", None)]
    assert compute_routes("shop", props, ALL) == []
    assert compute_routes("unregistered", props, ALL) == []
    # A target registered later is in all_targets then, and routed.
    assert compute_routes("late", props, ALL | {"late"}) == [("shop", None)]


def test_bidirectional_routes_both_ways() -> None:
    props = [P(BI, "a", "b", types="x.>")]
    assert compute_routes("b", props, ALL) == [("a", "x.>")]
    assert compute_routes("a", props, ALL) == [("b", "x.>")]
    assert compute_routes("c", props, ALL) == []


def test_routes_accumulate() -> None:
    props = [P(UNI, "shop", "a", types="order.*"), P(BROAD, "ops"), P(BI, "a", "b")]
    routes = compute_routes("a", props, ALL)
    assert sorted(routes, key=str) == sorted(
        [("shop", "order.*"), ("ops", None), ("b", None)], key=str
    )
    assert route_accepts(routes, "shop", "order.created")
    assert not route_accepts(routes, "shop", "user.created")
    assert route_accepts(routes, "ops", "anything.at.all")
    assert not route_accepts(routes, "crm", "order.created")


def test_filters_for() -> None:
    s = Subjects("mesh")
    routes = [("shop", "order.*"), ("shop", None), ("ops", "alert")]
    assert filters_for(s, "a", routes) == [
        "mesh.evt.ops.alert",
        "mesh.evt.shop.>",
        "mesh.replay.a.>",
    ]
    assert filters_for(s, "a", []) == ["mesh.replay.a.>"]


def test_ack_wait() -> None:
    hook = Target(name="h", kind=TargetKind.WEBHOOK, url="https://x", timeout_s=30)
    assert ack_wait_for(hook) == 65
    assert ack_wait_for(Target(name="n", kind=TargetKind.NATS, timeout_s=1), 2) == 2
    assert ack_wait_for(Target(name="n", kind=TargetKind.NATS, timeout_s=45), 2) == 45


def test_describe() -> None:
    assert P(UNI, "shop", "a", types="order.*").describe() == "shop -> a [order.*]"
    assert P(BI, "a", "b").describe() == "a <-> b"
    assert P(BROAD, "ops").describe() == "ops -> *"
    assert P(MULTI, "s", "a", "b").describe() == "s -> a,b"


# The registry over KV -----------------------------------------------------------


async def test_target_crud(client: MeshClient) -> None:
    reg = client.registry
    await add_nats_target(client, "billing")
    t = await reg.get_target("billing")
    assert (t.name, t.kind, t.consumer) == ("billing", TargetKind.NATS, "deliver-billing")
    with pytest.raises(Conflict, match="already exists"):
        await add_nats_target(client, "billing")
    with pytest.raises(NotFound, match="unknown target 'nope'"):
        await reg.get_target("nope")
    with pytest.raises(InvalidName):
        await reg.get_target("No Such")
    with pytest.raises(InvalidName):
        await add_nats_target(client, "Bad.Name")
    assert [x.name for x in await reg.list_targets()] == ["billing"]
    await client.remove_target("billing")
    assert await reg.list_targets() == []
    with pytest.raises(NotFound):
        await client.remove_target("billing")
    # Re-adding a removed name works (KV create over a delete marker).
    await add_nats_target(client, "billing")
    assert [x.name for x in await reg.list_targets()] == ["billing"]


async def test_webhook_secret_is_sealed(client: MeshClient) -> None:
    t = Target(name="hook", kind=TargetKind.WEBHOOK, url="http://127.0.0.1:9/x")
    await client.add_target(t, "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
    entry = await client.registry.kv.get("targets.hook")
    assert entry.value is not None
    assert b"c2VjcmV0" not in entry.value
    stored = await client.registry.get_target("hook")
    assert client.registry.secrets_for(stored) == ["whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ="]
    assert "secret_enc" not in stored.public() and stored.public()["has_secret"]
    with pytest.raises(ValidationError, match="whsec_"):
        await client.add_target(
            Target(name="hook2", kind=TargetKind.WEBHOOK, url="http://127.0.0.1:9/"), "plain"
        )
    with pytest.raises(ValidationError, match="--webhook"):
        await client.add_target(Target(name="hook3", kind=TargetKind.WEBHOOK))


async def test_propagation_rules(client: MeshClient) -> None:
    await add_nats_target(client, "a")
    await add_nats_target(client, "b")
    add = client.add_propagation
    with pytest.raises(NotFound, match="unknown target 'zz'"):
        await add(UNI, "shop", ["zz"])
    with pytest.raises(ValidationError, match="exactly one"):
        await add(UNI, "shop", ["a", "b"])
    with pytest.raises(ValidationError, match="exactly one"):
        await add(BI, "a", [])
    with pytest.raises(ValidationError, match="no --target"):
        await add(BROAD, "shop", ["a"])
    with pytest.raises(ValidationError, match="at least one"):
        await add(MULTI, "shop", [])
    with pytest.raises(ValidationError, match="itself"):
        await add(UNI, "a", ["a"])
    with pytest.raises(NotFound, match="both ends"):
        await add(BI, "shop", ["a"])
    with pytest.raises(InvalidName):
        await add(UNI, "Shop", ["a"])
    with pytest.raises(ValidationError, match="pattern"):
        await add(UNI, "shop", ["a"], "order.>.x")
    p = await add(MULTI, "shop", ["a", "b", "a"], "order.*")
    assert p.targets == ["a", "b"]
    with pytest.raises(Conflict, match=p.id):
        await add(MULTI, "shop", ["b", "a"], "order.*")
    assert [x.id for x in await client.registry.list_propagations()] == [p.id]
    assert (await client.registry.get_propagation(p.id)).targets == ["a", "b"]
    with pytest.raises(NotFound):
        await client.remove_propagation("000000000000")
    with pytest.raises(ValidationError):
        await client.remove_propagation("../etc")
    # Nothing above left a trace.
    assert len(await client.registry.list_propagations()) == 1


async def test_can_request_only_along_bidirectional(client: MeshClient) -> None:
    await add_nats_target(client, "a")
    await add_nats_target(client, "b")
    await client.add_propagation(UNI, "a", ["b"])
    assert not await client.registry.can_request("a", "b")
    await client.add_propagation(BI, "a", ["b"])
    assert await client.registry.can_request("a", "b")
    assert await client.registry.can_request("b", "a")


async def test_revision_moves_on_every_change(client: MeshClient) -> None:
    r0 = await client.registry.revision()
    await add_nats_target(client, "a")
    r1 = await client.registry.revision()
    p = await client.add_propagation(BROAD, "ops")
    r2 = await client.registry.revision()
    await client.remove_propagation(p.id)
    r3 = await client.registry.revision()
    assert r0 < r1 < r2 < r3


async def test_an_invalid_entry_does_not_break_listing(client: MeshClient) -> None:
    await add_nats_target(client, "good")
    await client.registry.kv.put("targets.broken", b"{not json")
    await client.registry.kv.put("props.broken", b'{"mode": "sideways"}')
    assert [t.name for t in await client.registry.list_targets()] == ["good"]
    assert await client.registry.list_propagations() == []
    # And reconciling everything still works.
    assert set(await client.init()) == {"good"}


async def test_reconcile_is_idempotent_and_prunes(client: MeshClient) -> None:
    await add_nats_target(client, "a")
    await client.add_propagation(BROAD, "ops")
    first = await client.init()
    assert first == {"a": ["mesh.evt.ops.>", "mesh.replay.a.>"]}
    assert await client.init() == first
    # A consumer left behind by a target removed elsewhere is pruned.
    await client.registry.kv.delete("targets.a")
    assert await client.init() == {}
    assert [n async for n in client.provisioner._deliver_consumers()] == []


async def test_listing_reads_every_key_and_leaves_no_consumer_behind(client: MeshClient) -> None:
    """Listings read the bucket's subjects and each key's last value. (They used a KV
    watcher, which could report the end of the initial values before they arrived, so a
    registry read as empty and reconcile_all deleted every consumer; and each left an
    ephemeral consumer for five minutes, of which the server allows a thousand.)"""
    for name in ("alpha", "beta", "gamma"):
        await add_nats_target(client, name)
    await client.add_propagation("multicast", "shop", ["alpha", "beta", "gamma"])
    await client.remove_target("beta")  # a deleted key is skipped, not an error
    stream = f"KV_{client.names.registry}"
    before = (await client.js.stream_info(stream)).state.consumer_count
    for _ in range(50):
        assert [t.name for t in await client.registry.list_targets()] == ["alpha", "gamma"]
        assert [p.targets for p in await client.registry.list_propagations()] == [
            ["alpha", "gamma"]
        ]
    assert (await client.js.stream_info(stream)).state.consumer_count == before


async def test_a_deleted_key_reads_as_absent(client: MeshClient) -> None:
    kv = client.registry.kv
    await kv.put("scratch.key", b"value")
    got = await read(kv, "scratch.key")
    assert got is not None and got[0] == b"value"
    await kv.delete("scratch.key")  # nats.py's get raises KeyDeletedError, not KeyNotFound
    assert await read(kv, "scratch.key") is None
    assert "scratch.key" not in await client.port.read_all(kv, client.names.registry)


async def test_propagation_signatures_replace_the_listing(
    client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Duplicates are found by their signature key, not by reading every propagation:
    after the one-time index of older propagations, adding one never lists the bucket."""
    reg = client.registry
    for name in ("a", "b", "c"):
        await add_nats_target(client, name)
    # a propagation written as before signatures existed (no propsig key, no marker)
    old = Propagation(mode=PropagationMode.MULTICAST, source="src", targets=["a", "b"])
    await reg.kv.create(f"props.{old.id}", old.model_dump_json().encode())
    with pytest.raises(Conflict, match=old.id):  # indexed by the first add
        await reg.add_propagation(PropagationMode.MULTICAST, "src", ["b", "a"])
    assert await read(reg.kv, "meta.propsig") is not None

    reads = 0
    real = reg._snapshot

    async def counted() -> dict[str, bytes]:
        nonlocal reads
        reads += 1
        return await real()

    monkeypatch.setattr(reg, "_snapshot", counted)
    p = await reg.add_propagation(PropagationMode.UNIDIRECTIONAL, "src", ["c"])
    with pytest.raises(Conflict, match=p.id):
        await reg.add_propagation(PropagationMode.UNIDIRECTIONAL, "src", ["c"])
    # a different propagation is no duplicate, and nothing was listed for any of these
    await reg.add_propagation(PropagationMode.BROADCAST, "src", types="x.*")
    assert reads == 0

    # removing a target rewrites a multicast: its signature follows it
    await client.remove_target("b")
    with pytest.raises(Conflict, match=old.id):
        await reg.add_propagation(PropagationMode.MULTICAST, "src", ["a"])
    # a removed propagation frees its signature; a stale pointer is not a duplicate
    await reg.remove_propagation(p.id)
    again = await reg.add_propagation(PropagationMode.UNIDIRECTIONAL, "src", ["c"])
    await reg.kv.delete(f"props.{again.id}")  # bypassing the registry leaves the key behind
    await reg.add_propagation(PropagationMode.UNIDIRECTIONAL, "src", ["c"])


async def test_one_reading_per_revision_shared_by_every_caller(
    client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = client.registry
    for i in range(5):
        await add_nats_target(client, f"t{i}")
    await reg.add_propagation(PropagationMode.BROADCAST, "src")
    reads = 0
    real = reg._snapshot

    async def counted() -> dict[str, bytes]:
        nonlocal reads
        reads += 1
        return await real()

    monkeypatch.setattr(reg, "_snapshot", counted)
    reg._cache.forget()
    routes = await asyncio.gather(*(reg.routes_for(f"t{i}") for i in range(5)))
    assert routes == [[("src", None)]] * 5 and reads == 1
    listed = await reg.list_targets()
    listed[0].url = "changed"  # callers get copies: the shared reading stays as it was
    assert reads == 1 and (await reg.list_targets())[0].url is None
    await add_nats_target(client, "t5")  # a change: the next caller reads again
    assert await reg.routes_for("t5") == [("src", None)] and reads == 2


@pytest.mark.slow
async def test_the_events_stream_takes_more_than_a_thousand_consumers(
    client: MeshClient, broker: EmbeddedBroker
) -> None:
    """nats-server 2.15 caps a stream at 1,000 consumers unless it sets its own limit: the
    events stream sets one (``MESH_MAX_CONSUMERS``), also on a stream made before it did."""
    from dataclasses import replace

    from nats.js.api import AckPolicy, ConsumerConfig

    from mesh.streams import ensure_streams, stream_configs

    events = stream_configs(client.settings)[0]
    assert events.max_consumers == client.settings.max_consumers
    await client.js.update_stream(replace(events, max_consumers=None))  # as made before
    await ensure_streams(client.port, client.settings)  # updated in place, not refused
    info = await client.js.stream_info(client.names.events)
    assert info.config.max_consumers == client.settings.max_consumers
    sem = asyncio.Semaphore(32)

    async def add(i: int) -> None:
        async with sem:
            cfg = ConsumerConfig(durable_name=f"c{i}", ack_policy=AckPolicy.EXPLICIT)
            await client.js.add_consumer(client.names.events, cfg)

    await asyncio.gather(*(add(i) for i in range(1010)))
    assert (await client.js.stream_info(client.names.events)).state.consumer_count >= 1010
    broker.kill()  # a graceful stop with 1,010 consumers outlasts stop()'s 10 s grace

"""MeshClient against a real nats-server: dedupe, plain messages, encryption at rest,
redelivery, broker restarts, size limits, request/reply errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import structlog.testing
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy

from mesh._nats.pullfeed import PullFeed
from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.envelope import Event
from mesh.errors import (
    BrokerError,
    BrokerUnavailable,
    Conflict,
    NotFound,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    ValidationError,
)
from mesh.records import DeliveryRecord, Outcome
from mesh.registry import PropagationMode, Target, TargetKind
from mesh.replies import read_reply
from tests.conftest import add_nats_target
from tests.support.feeds import collect, eventually, queued, stream_count

UNI = PropagationMode.UNIDIRECTIONAL
BI = PropagationMode.BIDIRECTIONAL


async def route(client: MeshClient, source: str = "shop", target: str = "billing") -> None:
    await add_nats_target(client, target)
    await client.add_propagation(UNI, source, [target])


async def test_same_event_id_twice_is_stored_once(client: MeshClient) -> None:
    await route(client)
    a = await client.publish("shop", "order.created", {"n": 1}, id="order-7")
    b = await client.publish("shop", "order.created", {"n": 1}, id="order-7")
    assert a == b == "order-7"
    assert await stream_count(client) == 1
    # publish_many reports duplicates too.
    events = [client.build("shop", "order.created", i, id=f"bulk-{i % 2}") for i in range(4)]
    assert await client.publish_many(events) == 2
    assert await stream_count(client) == 3
    got = await collect(client, "billing", 3)
    assert [e.id for e in got] == ["order-7", "bulk-0", "bulk-1"]


async def test_plain_nats_message_is_an_event(client: MeshClient, settings: Settings) -> None:
    """What any NATS client sends: no ce-* headers, a JSON body, no encryption."""
    await route(client)
    nc = await nats.connect(settings.servers)
    try:
        js = nc.jetstream()
        ack = await js.publish("mesh.evt.shop.order.created", json.dumps({"order": 9}).encode())
        await js.publish(
            "mesh.evt.shop.order.created", b'{"order": 10}', headers={"Nats-Msg-Id": "ext-10"}
        )
        # Plain core-NATS publish (no JetStream ack) lands in the stream too.
        await nc.publish("mesh.evt.shop.order.created", b"not json \xff")
        await nc.flush()
    finally:
        await nc.close()
    got = await collect(client, "billing", 3)
    assert [(e.source, e.type) for e in got] == [("shop", "order.created")] * 3
    assert got[0].data == {"order": 9}
    assert got[0].id == f"seq-{ack.seq}"
    assert (got[1].id, got[1].data) == ("ext-10", {"order": 10})
    assert got[2].data == b"not json \xff"


async def test_payload_at_rest_is_ciphertext(client: MeshClient) -> None:
    await route(client)
    secret = "4111-1111-1111-1111"
    await client.publish("shop", "card.added", {"card": secret})
    await client.publish("shop", "card.added", secret.encode())
    for seq in (1, 2):
        raw = await client.js.get_msg(client.names.events, seq)
        assert raw.headers is not None and raw.headers["mesh-encryption"] == "fernet"
        assert raw.data is not None
        assert secret.encode() not in raw.data
        assert b"4111" not in raw.data
    got = await collect(client, "billing", 2)
    assert got[0].data == {"card": secret}
    assert got[1].data == secret.encode()


async def test_encryption_off_stores_plaintext(settings: Settings) -> None:
    plain = settings.model_copy(update={"encryption": False})
    async with MeshClient(plain, name="plain") as c:
        await c.init()
        await route(c)
        await c.publish("shop", "x", {"visible": "yes"}, datacontenttype="application/json")
        raw = await c.js.get_msg(c.names.events, 1)
        assert raw.headers is not None and "mesh-encryption" not in raw.headers
        assert raw.data == b'{"visible":"yes"}'
        assert [e.data for e in await collect(c, "billing", 1)] == [{"visible": "yes"}]


@pytest.fixture
async def quick(settings: Settings) -> AsyncIterator[MeshClient]:
    """A client whose nats targets are redelivered after 1 s without an ack."""
    s = settings.model_copy(update={"ack_wait_min_s": 1.0})
    async with MeshClient(s, name="quick") as c:
        await c.init()
        await c.add_target(Target(name="billing", kind=TargetKind.NATS, timeout_s=1))
        await c.add_propagation(UNI, "shop", ["billing"])
        yield c


async def test_unacked_events_come_back(quick: MeshClient, settings: Settings) -> None:
    info = await quick.js.consumer_info(quick.names.events, "deliver-billing")
    assert info.config.ack_wait == 1.0
    ids = [await quick.publish("shop", "order.created", i) for i in range(3)]
    # A consumer that reads everything and dies before acking.
    async with MeshClient(settings, name="doomed") as doomed:
        got = await collect(doomed, "billing", 3, ack=False)
        assert [e.id for e in got] == ids
    # Another consumer gets all three again, marked as redeliveries.
    attempts: list[int] = []
    stop = asyncio.Event()
    again: list[str] = []
    async for d in quick.consume("billing", expires=0.25, stop=stop):
        again.append(d.event.id)
        attempts.append(d.attempt)
        await d.ack()
        if len(again) == 3:
            stop.set()
    assert again == ids
    assert all(a >= 2 for a in attempts)
    assert await queued(quick, "billing") == 0


async def test_stopping_early_gives_back_the_rest_of_the_batch(client: MeshClient) -> None:
    """Fetched but not handed out: naked on close, not held for ack_wait (30 s here)."""
    await route(client)
    ids = [await client.publish("shop", "order.created", i) for i in range(3)]
    async for d in client.consume("billing", batch=10, expires=0.25):
        assert d.event.id == ids[0]
        await d.ack()
        break
    rest = await collect(client, "billing", 2, timeout=10)
    assert [e.id for e in rest] == ids[1:]


async def test_undecodable_message_goes_to_the_dlq(client: MeshClient) -> None:
    await route(client)
    await client.js.publish(
        "mesh.evt.shop.x",
        b"gAAAAAnot-a-token",
        headers={"mesh-encryption": "fernet", "Nats-Msg-Id": "bad-1"},
    )
    good = await client.publish("shop", "x", 1)
    assert [e.id for e in await collect(client, "billing", 1)] == [good]
    assert await stream_count(client, client.names.dlq) == 1
    dead = await client.js.get_msg(client.names.dlq, 1)
    assert dead.headers is not None
    assert dead.headers["mesh-dlq-target"] == "billing"
    assert "undecodable" in dead.headers["mesh-dlq-error"]
    assert dead.data == b"gAAAAAnot-a-token"


@pytest.mark.slow
async def test_broker_restart_loses_nothing(
    client: MeshClient, broker: EmbeddedBroker, settings: Settings
) -> None:
    """File storage keeps events across a restart, and a running consume loop resumes
    (the pull subscription is re-created after the reconnect: nats.py #504)."""
    await route(client)
    got: list[Event] = []
    stop = asyncio.Event()

    async def run() -> None:
        async for d in client.consume("billing", expires=0.5, stop=stop):
            got.append(d.event)
            await d.ack()

    loop_task = asyncio.create_task(run())
    try:
        first = await client.publish("shop", "order.created", 1)
        await eventually(lambda: _ids(got, [first]))
        # Published by another client just before the broker goes down; the loop keeps
        # running across the restart.
        async with MeshClient(settings, name="other") as other:
            waiting = await other.publish("shop", "order.created", 2)
        await broker.astop()
        await broker.astart()
        await asyncio.wait_for(client.connected_event.wait(), 20)
        after = await client.publish("shop", "order.created", 3)
        await eventually(lambda: _ids(got, [first, waiting, after]), timeout=30)
        assert client.reconnects >= 1
    finally:
        stop.set()
        await asyncio.wait_for(loop_task, 10)
    assert await stream_count(client) == 3


async def _ids(events: list[Event], ids: list[str]) -> bool:
    return sorted(e.id for e in events) == sorted(ids)


async def test_payload_too_large(tmp_path: Path) -> None:
    small = EmbeddedBroker(tmp_path / "small", port=free_port(), max_payload=4096)
    small.start()
    try:
        s = Settings(home=tmp_path / "home", nats_url=small.url)
        async with MeshClient(s, name="t") as c:
            await c.init()
            with pytest.raises(PayloadTooLarge) as info:
                await c.publish("shop", "blob", b"x" * 5000)
            assert info.value.max_payload == 4096
            assert info.value.size > 4096
            assert "max_payload of 4096" in str(info.value)
            await c.publish("shop", "blob", b"x" * 1000)
            assert await stream_count(c) == 1
    finally:
        small.stop()


async def test_bad_input_is_refused_before_the_broker(client: MeshClient) -> None:
    for bad in [("Shop", "x"), ("shop", "order.*"), ("shop", ""), ("a.b", "x")]:
        with pytest.raises(ValidationError):
            await client.publish(*bad, 1)
    with pytest.raises(ValidationError, match="event id"):
        await client.publish("shop", "x", 1, id="has space")
    with pytest.raises(ValidationError):
        await client.publish("shop", "x", {1, 2})  # not serialisable
    assert await stream_count(client) == 0


async def test_hop_limit_on_publish(client: MeshClient) -> None:
    cause = Event(source="a", type="t", hops=client.settings.max_hops)
    with pytest.raises(ValidationError, match="hop limit"):
        await client.publish("b", "t", 1, cause=cause)


async def test_request_errors(client: MeshClient) -> None:
    await add_nats_target(client, "a")
    await add_nats_target(client, "b")
    with pytest.raises(NotFound):
        await client.request("a", "zz", "ping")
    with pytest.raises(Conflict, match="no bidirectional"):
        await client.request("a", "b", "ping")
    await client.add_propagation(BI, "a", ["b"])
    with pytest.raises(RequestError, match="no responder"):
        await client.request("a", "b", "ping", timeout=2)

    async def slow(e: Event) -> None:
        await asyncio.sleep(5)

    async def broken(e: Event) -> None:
        raise RuntimeError("boom")

    sub = await client.serve_requests("b", slow)
    try:
        with pytest.raises(RequestTimeout):
            await client.request("a", "b", "ping", timeout=0.3)
    finally:
        await sub.unsubscribe()
    sub = await client.serve_requests("a", broken)
    try:
        reply = await client.request("b", "a", "ping", timeout=5)
        assert (reply.status, reply.data) == (500, {"error": "RuntimeError"})
    finally:
        await sub.unsubscribe()


async def test_request_payload_is_encrypted_on_the_wire(client: MeshClient) -> None:
    await add_nats_target(client, "a")
    await add_nats_target(client, "b")
    await client.add_propagation(BI, "a", ["b"])
    wire: list[bytes] = []

    async def spy(msg: nats.aio.msg.Msg) -> None:
        wire.append(msg.data)

    spy_sub = await client.nc.subscribe("mesh.rpc.b.>", cb=spy)

    async def answer(e: Event) -> dict[str, str]:
        return {"echo": e.data["pin"]}

    sub = await client.serve_requests("b", answer)
    try:
        reply = await client.request("a", "b", "check", {"pin": "98765"}, timeout=5)
        assert reply.data == {"echo": "98765"}
        await eventually(lambda: _true(bool(wire)))
        assert b"98765" not in wire[0]
    finally:
        await sub.unsubscribe()
        await spy_sub.unsubscribe()


async def _true(value: bool) -> bool:
    return value


async def test_unreachable_broker(tmp_path: Path) -> None:
    s = Settings(home=tmp_path, nats_url=f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5)
    with pytest.raises(BrokerUnavailable, match="cannot connect to NATS"):
        await MeshClient(s, reconnect_forever=False).connect()


async def test_no_streams_yet(settings: Settings) -> None:
    async with MeshClient(settings, name="fresh") as c:
        with pytest.raises(BrokerError, match="mesh init"):
            await c.publish("shop", "x", 1)


async def test_consume_unknown_target(client: MeshClient) -> None:
    with pytest.raises(NotFound):
        async for _ in client.consume("ghost"):
            pass


async def test_close_twice_is_harmless(settings: Settings) -> None:
    c = await MeshClient(settings).connect()
    await c.close()
    await c.close()


async def test_a_request_without_a_source_is_refused(client: MeshClient) -> None:
    await add_nats_target(client, "a")
    await add_nats_target(client, "b")
    await client.add_propagation(BI, "a", ["b"])
    handled: list[Event] = []

    async def answer(e: Event) -> int:
        handled.append(e)
        return 1

    sub = await client.serve_requests("b", answer)
    try:
        # A bare NATS request (no ce-* headers): answered 400, never handed to the handler.
        msg = await client.nc.request("mesh.rpc.b.ping", b"{}", timeout=5)
        assert msg.headers is not None and msg.headers["mesh-status"] == "400"
        reply = read_reply(msg, client.keyring_or_none())
        assert "ce-source" in reply.data["error"]
        with pytest.raises(ValidationError, match="invalid source name"):
            await client.request("Bad!", "b", "ping")
        assert handled == []
    finally:
        await sub.unsubscribe()


async def test_a_cancelled_pull_stops_even_when_the_cancellation_is_swallowed(
    client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11 nats.py's fetch can turn a cancellation that races its 408 into a
    plain timeout (asyncio.wait_for, CPython gh-86296). ``pull`` retries timeouts; it must
    still stop, or whoever cancelled it (``wait_for`` around ``anext``) waits forever.
    CI once hung 120 s in a test this way."""
    await add_nats_target(client, "alpha")
    fetches_after_cancel = 0

    async def fetch_that_swallows(self: object, batch: int = 1, timeout: float = 5) -> list[Msg]:
        nonlocal fetches_after_cancel
        task = asyncio.current_task()
        assert task is not None
        if task.cancelling():
            fetches_after_cancel += 1
            if fetches_after_cancel > 20:
                raise RuntimeError("pull kept fetching after it was cancelled")
        # What the race does: the cancellation is gone, a timeout is raised.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(timeout)
        raise nats.errors.TimeoutError

    # pull fetches through PullFeed (its own wait cannot drop a cancellation, but the
    # guard must hold whatever fetch it uses).
    monkeypatch.setattr(PullFeed, "fetch", fetch_that_swallows)
    feed = client.deliveries.pull("deliver-alpha", expires=0.05)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(feed), 0.2)
    assert fetches_after_cancel == 0


async def test_publish_without_a_stream_says_run_init(settings: Settings) -> None:
    async with MeshClient(settings, name="t") as c:  # never `init`: no stream yet
        with pytest.raises(BrokerError, match="no stream stores mesh events"):
            await c.publish("shop", "x", 1)


async def test_publish_nobody_acknowledges_times_out(client: MeshClient) -> None:
    # A plain subscriber answers nothing: the publish must give up at its timeout.
    await client.js.delete_stream(client.names.events)
    sub = await client.nc.subscribe(client.subjects.evt("shop", "x"))
    try:
        with pytest.raises(BrokerError, match=r"timed out after 0\.3s"):
            await client.publish("shop", "x", 1, timeout=0.3)
    finally:
        await sub.unsubscribe()


async def test_publish_refused_by_the_stream_is_an_error(client: MeshClient) -> None:
    # A stream that takes one message and refuses the next (discard new).
    info = await client.js.stream_info(client.names.events)
    config = info.config
    config.max_msgs = 1
    config.discard = DiscardPolicy.NEW
    await client.js.update_stream(config)
    await client.publish("shop", "x", 1)
    with pytest.raises(BrokerError, match=r"refused: .*maximum messages"):
        await client.publish("shop", "x", 2)
    assert await stream_count(client) == 1


async def test_a_refused_delivery_record_is_logged_not_raised(settings: Settings) -> None:
    async with MeshClient(settings, name="t") as c:  # never `init`: no MESH_SYS stream
        with structlog.testing.capture_logs() as logs:
            await c.deliveries.record(DeliveryRecord("e1", "t1", 1, Outcome.DELIVERED))
    [line] = [e for e in logs if e["event"] == "delivery record not published"]
    assert line["target"] == "t1" and "503" in line["error"]

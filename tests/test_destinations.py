"""Destinations beyond HTTP against their real systems: RabbitMQ, Mosquitto and Redis (the
machine's servers, reached through a proxy the test can cut), SQS and S3 (moto's server,
an emulator of the AWS APIs, in a subprocess), Kafka (Tansu, a real Apache-Kafka-compatible
broker written in Rust, not Apache Kafka itself, started per test behind the proxy). One
test per promise, parametrized over the drivers: every event arrives as published, an
outage loses nothing, the breaker opens and closes, a permanent failure is dead-lettered,
an ordered target keeps order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from mesh.client import MeshClient
from mesh.destinations import DestinationOptions
from mesh.envelope import Event
from mesh.registry import Target, TargetKind
from services.egress.service import WebhookEgress
from tests.support import eventually
from tests.support.destinations import KINDS, Destination, MotoServer, moto_server, server_url
from tests.support.kafka import kafka_behind_proxy
from tests.support.proxy import TCPProxy
from tests.support.receiver import dead_letters, delivery_records, fast_policy


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


@asynccontextmanager
async def destination(
    kind: str, request: pytest.FixtureRequest, ordered: bool = False
) -> AsyncIterator[Destination]:
    """A place of this test's own at the real system, reached through a proxy."""
    pytest.importorskip(
        {"amqp": "aio_pika", "mqtt": "aiomqtt", "redis": "redis", "kafka": "aiokafka"}.get(
            kind, "aiobotocore"
        )
    )
    if kind == "kafka":
        async with (
            kafka_behind_proxy() as (broker, proxy),
            Destination(kind, f"kafka://{broker.bootstrap}", proxy, ordered) as d,
        ):
            yield d
        return
    aws = kind in ("sqs", "s3")
    upstream = request.getfixturevalue("moto").url if aws else server_url(kind)
    host, port = _host_port(upstream)
    async with TCPProxy(host, port) as proxy, Destination(kind, upstream, proxy, ordered) as d:
        yield d


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    default = {"amqp": 5672, "mqtt": 1883, "redis": 6379, "http": 80}[parts.scheme]
    return parts.hostname or "127.0.0.1", parts.port or default


async def add_target(
    client: MeshClient, name: str, d: Destination, options: dict[str, Any] | None = None, **kw: Any
) -> None:
    kw.setdefault("retry", fast_policy(max_retries=100))
    kw.setdefault("timeout_s", 3.0)
    kw.setdefault("circuit_open_s", 0.5)
    kw.setdefault("circuit_threshold", 50)
    target = Target(
        name=name,
        kind=TargetKind(d.kind),
        url=d.url,
        options=DestinationOptions(**(options if options is not None else d.options)),
        **kw,
    )
    await client.add_target(target)
    await client.add_propagation("unidirectional", "shop", [name])


def events(n: int) -> list[Event]:
    return [Event(source="shop", type="order.created", data={"n": i}) for i in range(n)]


async def received_all(d: Destination, want: set[str]) -> bool:
    await d.poll()
    return want <= set(d.received.ids)


@asynccontextmanager
async def polling(d: Destination) -> AsyncIterator[None]:
    """Read the destination all along (the reader talks to the server, not the proxy)."""

    async def loop() -> None:
        while True:
            await d.poll()
            await asyncio.sleep(0.05)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.slow
@pytest.mark.timeout(300)  # moto serves SQS/S3 at some 100 requests/s, far less under load
@pytest.mark.parametrize("kind", KINDS)
async def test_thousand_events_arrive_as_published_through_an_outage(
    kind: str, request: pytest.FixtureRequest, client: MeshClient, egress: WebhookEgress
) -> None:
    async with destination(kind, request) as d, contextlib.AsyncExitStack() as stack:
        # moto answers one request at a time or so: a few in flight, a longer timeout.
        emulated = kind in ("sqs", "s3")
        await add_target(
            client,
            "dest",
            d,
            max_in_flight=16 if emulated else 64,
            timeout_s=10.0 if emulated else 3.0,
            # Some 4 s for the 1,000 at most, so the cut below lands mid-stream even for
            # the fast systems (Redis, Kafka) instead of after the last delivery.
            rate=250.0,
        )
        if kind == "sqs":  # moto scans the whole queue per receive: keep it short
            await stack.enter_async_context(polling(d))
        published = events(1000)
        assert await client.publish_many(published) == 1000

        def sent() -> int:  # what the destination has taken, by the egress's count
            return int(egress.stats()["targets"].get("dest", {}).get("delivered", 0))

        async def sent_200() -> bool:
            return sent() >= 200

        async def arrived(n: int) -> bool:
            return await d.count() >= n

        # The egress's count, not the destination's: reading moto back (ten messages per
        # SQS request) lags the sends by seconds, and the cut must come mid-stream.
        await eventually(sent_200, 60, "the first 200 deliveries", interval=0.05)
        d.proxy.trigger_connectivity_loss()  # the destination goes away mid-stream
        assert sent() < 1000, "the cut came after the last delivery"
        await asyncio.sleep(1.0)
        d.proxy.restore_connectivity()
        want = {e.id for e in published}
        try:
            await eventually(lambda: arrived(1000), 240, "1000 arrivals", interval=0.5)
            await eventually(lambda: received_all(d, want), 60, "all 1000 events", interval=0.5)
        except AssertionError:
            missing = want - set(d.received.ids)
            stats = egress.stats()["targets"].get("dest")
            raise AssertionError(f"{len(missing)} events missing; egress: {stats}") from None
        # Every id, each with the data it was published with; nothing else.
        assert set(d.received.ids) == want
        for e in published:
            assert d.received.data[e.id] == e.data
        # At least once: a duplicate may only come from the outage (a send whose
        # acknowledgement the cut lost), never more than were on the wire: 64 events,
        # or SQS's 16 requests of ten (SendMessageBatch).
        on_wire = 16 * 10 if kind == "sqs" else 16 if emulated else 64
        assert len(d.received.ids) - len(want) <= on_wire
        assert egress.stats()["targets"]["dest"]["kind"] == kind


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
async def test_breaker_opens_and_closes_and_order_is_kept(
    kind: str, request: pytest.FixtureRequest, client: MeshClient, egress: WebhookEgress
) -> None:
    async with destination(kind, request, ordered=True) as d:
        await add_target(
            client, "dest", d, ordered=True, circuit_threshold=2, circuit_open_s=0.5, timeout_s=2
        )
        d.proxy.trigger_connectivity_loss()
        published = events(20)
        await client.publish_many(published)
        await eventually(
            lambda: egress.stats()["circuits"].get("dest") == "open", 20, "the circuit to open"
        )
        d.proxy.restore_connectivity()
        want = {e.id for e in published}
        await eventually(lambda: received_all(d, want), 30, "the 20 events")
        await eventually(
            lambda: egress.stats()["circuits"].get("dest") == "closed", 10, "the circuit to close"
        )
        first_seen = list(dict.fromkeys(d.received.ids))
        if kind != "s3":  # objects in a bucket have no order to keep
            assert first_seen == [e.id for e in published]
        assert not await dead_letters(client, "dest")


@pytest.mark.parametrize("kind", KINDS)
async def test_permanent_failure_is_dead_lettered(
    kind: str, request: pytest.FixtureRequest, client: MeshClient, egress: WebhookEgress
) -> None:
    async with destination(kind, request) as d:
        options = await d.broken()  # a missing exchange, queue, bucket; a wrong-type key
        await add_target(client, "dest", d, options=options)
        event_id = await client.publish("shop", "order.created", {"n": 1})
        dead = await eventually(lambda: dead_letters(client, "dest"), 20, "a dead letter")
        assert [x.event_id for x in dead] == [event_id]
        records = await eventually(lambda: delivery_records(client, "dest"), 10, "a record")
        assert [(r.outcome, r.attempt) for r in records] == [("dead", 1)]
        assert records[0].error
        assert "secret" not in (records[0].error or "")  # the URL's password never shows
        await d.poll()
        assert event_id not in d.received.ids

"""PullFeed: nats.py's fetch protocol without a task per message (real nats-server)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats.errors as nats_errors
import nats.js.errors as js_errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from mesh._nats.pullfeed import PullFeed
from mesh.client import MeshClient


async def consumer(client: MeshClient, name: str, ack_wait: float = 30) -> None:
    await client.js.add_consumer(
        client.names.events,
        ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait),
    )


async def test_batches_are_bounded_and_ackable(client: MeshClient) -> None:
    await consumer(client, "feed")
    events = [client.build("shop", "order.created", {"i": i}) for i in range(25)]
    await client.publish_many(events)
    feed = await PullFeed(client.nc, client.names.events, "feed").open()
    try:
        got = []
        while len(got) < 25:
            msgs = await feed.fetch(10, timeout=2)
            assert 1 <= len(msgs) <= 10
            for msg in msgs:
                await msg.ack()
            got.extend(msgs)
        ids = [client.deliveries.decode(m).id for m in got]
        assert ids == [e.id for e in events]
        assert got[-1].metadata.sequence.stream == 25
        with pytest.raises(nats_errors.TimeoutError):
            await feed.fetch(5, timeout=0.3)  # nothing left: the server's 408 ends it
    finally:
        await feed.close()


async def test_a_message_published_during_a_fetch_comes_at_once(client: MeshClient) -> None:
    await consumer(client, "feed")
    feed = await PullFeed(client.nc, client.names.events, "feed").open()
    try:
        fetch = asyncio.create_task(feed.fetch(64, timeout=5))
        await asyncio.sleep(0.2)
        started = asyncio.get_running_loop().time()
        await client.publish("shop", "order.created", {"n": 1})
        msgs = await fetch
        assert len(msgs) == 1
        assert asyncio.get_running_loop().time() - started < 2  # not the whole expiry
    finally:
        await feed.close()


async def test_close_hands_back_what_was_never_handed_out(client: MeshClient) -> None:
    await consumer(client, "feed")
    await client.publish_many([client.build("shop", "a.b", {"i": i}) for i in range(3)])
    feed = await PullFeed(client.nc, client.names.events, "feed").open()
    msgs = await feed.fetch(1, timeout=2)
    assert len(msgs) == 1
    await msgs[0].ack()
    # Messages that arrive for nobody (a request made outside fetch) are kept, not lost.
    await client.nc.publish(feed.subject, b'{"batch": 2}', reply=feed.inbox)
    for _ in range(100):
        if len(feed._kept) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(feed._kept) == 2
    await feed.close()  # naks them: redelivered now, not after ack_wait (30 s)
    again = await PullFeed(client.nc, client.names.events, "feed").open()
    try:
        # The naks reach the consumer asynchronously: a no-wait fetch may find one ready
        # before the other. Both must be back well inside the ack wait (30 s).
        redelivered: list[Msg] = []
        deadline = time.monotonic() + 5
        while len(redelivered) < 2 and time.monotonic() < deadline:
            with contextlib.suppress(nats_errors.TimeoutError):
                redelivered += await again.fetch(5, timeout=1)
        assert [m.metadata.num_delivered for m in redelivered] == [2, 2]
    finally:
        await again.close()


async def test_a_missing_consumer_is_service_unavailable(client: MeshClient) -> None:
    feed = await PullFeed(client.nc, client.names.events, "nobody").open()
    try:
        with pytest.raises(js_errors.ServiceUnavailableError):
            await feed.fetch(5, timeout=1)
    finally:
        await feed.close()


async def test_the_mesh_connection_hands_messages_straight_to_the_feed(client: MeshClient) -> None:
    # MeshNats.subscribe_direct: no queue and task per message; gone with the feed.
    await consumer(client, "feed")
    await client.publish_many([client.build("shop", "order.created", {"i": 1})])
    feed = await PullFeed(client.nc, client.names.events, "feed").open()
    sub = feed._sub
    assert sub is not None and sub._id in client.nc._direct
    assert sub._wait_for_msgs_task is None
    msgs = await feed.fetch(5, timeout=2)
    assert len(msgs) == 1
    await msgs[0].ack()
    await feed.close()
    assert sub._id not in client.nc._direct

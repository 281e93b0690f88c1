"""The AMQP driver's own, against the machine's RabbitMQ (the promises every driver keeps
are in tests/test_destinations.py): a batch's publishes leave in one socket write, in
order, each confirmed; the message properties are the ones aio-pika would make."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("aio_pika")

from mesh.destinations import DestinationOptions
from mesh.envelope import Event
from mesh.registry import Target, TargetKind
from services.egress.drivers.amqp import WRITE_QUEUE, AmqpDriver
from tests.support import eventually
from tests.support.destinations import Destination, server_url
from tests.support.proxy import TCPProxy


@pytest.fixture
async def amqp() -> AsyncIterator[Destination]:
    from urllib.parse import urlsplit

    upstream = server_url("amqp")
    parts = urlsplit(upstream)
    async with (
        TCPProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy,
        Destination("amqp", upstream, proxy) as d,
    ):
        yield d


def _driver(url: str, **options: Any) -> AmqpDriver:
    target = Target(
        name="a",
        kind=TargetKind.AMQP,
        url=url,
        timeout_s=5.0,
        options=DestinationOptions(**options),
    )
    return AmqpDriver(target, url)


async def test_a_batch_leaves_in_one_socket_write_in_order(amqp: Destination) -> None:
    driver = _driver(amqp.url, **amqp.options)
    events = [Event(source="shop", type="order.created", data={"n": i}) for i in range(41)]
    try:
        assert (await driver.send(events[0])).ok  # connected
        # aiormq sizes the connection's write queue from FRAME_BUFFER_SIZE (pinned here).
        assert driver._conn.write_queue.maxsize == WRITE_QUEUE
        transport = driver._transport.writer.transport
        writes: list[int] = []
        write = transport.write

        def counted(data: bytes) -> None:
            writes.append(len(data))
            write(data)

        transport.write = counted
        results = await driver.send_batch(events[1:])
        del transport.write
    finally:
        await driver.close()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert len(writes) == 1, writes  # 40 publishes, one socket write
    await eventually(lambda: _all(amqp, len(events)), 10, "the 41 messages")
    assert amqp.received.ids == [e.id for e in events]


async def _all(d: Destination, n: int) -> bool:
    return len(d.received.ids) >= n


@pytest.mark.parametrize(
    "event",
    [
        Event(source="shop", type="order.created", data={"n": 1}),
        Event(
            source="shop",
            type="a.b",
            subject="o-1",
            data="hi",
            datacontenttype="text/plain",
            extensions={"tenant": "t1", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        ),
        Event(source="s", type="raw", data=b"\x00\xff"),
    ],
)
def test_properties_are_the_ones_aio_pika_makes(event: Event) -> None:
    import aio_pika
    from pamqp.header import ContentHeader

    from services.egress.drivers.formats import attributes, data_body

    body, properties, key = _driver("amqp://h/", exchange="x")._message(event)
    expected_body, ctype = data_body(event)
    message = aio_pika.Message(
        expected_body,
        content_type=ctype,
        message_id=event.id,
        type=event.type,
        timestamp=event.time,
        headers={f"cloudEvents_{k}": v for k, v in attributes(event).items()},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    assert body == message.body and key == event.type
    assert properties == message.properties
    wire = ContentHeader(1, len(body), properties).marshal()
    assert wire == ContentHeader(1, len(body), message.properties).marshal()

"""The AMQP 0-9-1 driver (RabbitMQ) over aiormq (aio-pika's engine, which the ``amqp``
extra installs with aio-pika): publish to an exchange with a routing-key template,
publisher confirms (an ack means the broker has it), mandatory routing (a message no
queue takes is a permanent failure, not a silent drop).

Format: CloudEvents binary mode, attributes as ``cloudEvents_<name>`` headers (the AMQP
binding's application-property prefix), the data as the body, its type as content type;
``message_id`` is the event id, ``type`` the event type; persistent delivery mode.

A batch (``Driver.send_batch``) is published on the one confirming channel back to
back and its confirms are awaited together: aiormq numbers the publishes in order and
RabbitMQ confirms them as it stores them (often several in one ``Basic.Ack`` with
``multiple``). Each publish still gets its own answer (ack, nack, return), so each
event its own result. The batch's frames leave in one socket write
(``CoalescingWriter``, through aiormq's public ``transport_factory``), not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

from mesh.destinations import DestinationOptions, render
from mesh.envelope import Event
from mesh.registry import Target
from services.egress.drivers.base import Driver, need
from services.egress.drivers.formats import attributes, data_body, fields_of

# Frames the connection's write queue holds (publishes queued for its writer task): room
# for a whole batch of the egress (at most 64) and then some.
WRITE_QUEUE = 256
PERSISTENT = 2  # delivery mode


class AmqpDriver(Driver):
    kind = "amqp"

    def __init__(self, target: Target, url: str) -> None:
        super().__init__(target)
        self.url = url
        self.options = target.options or DestinationOptions()
        self._conn: Any = None
        self._exchange = self.options.exchange or ""
        self._channel: Any = None  # aiormq's channel (aio-pika's engine)
        self._transport: Any = None  # the connection's transport factory (and its writer)

    async def _open(self) -> None:
        need("aio_pika", self.kind)  # the extra; aiormq (its engine) comes with it
        connection_class, factory = _classes()
        self._transport = factory()
        conn = connection_class(self.url, transport_factory=self._transport)
        try:
            async with asyncio.timeout(self.target.timeout_s):
                await conn.connect()
        except BaseException:
            with contextlib.suppress(Exception):  # what is half open goes too
                await conn.close()
            raise
        try:
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange = self.options.exchange or ""
            if self._exchange:
                # A passive declare: a missing exchange fails here, as a permanent failure.
                await channel.exchange_declare(exchange=self._exchange, passive=True)
        except BaseException:
            await conn.close()
            raise
        self._conn, self._channel = conn, channel

    async def _shut(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            await conn.close()

    def _message(self, event: Event) -> tuple[bytes, Any, str]:
        """The body, properties and routing key of one event's message: the properties
        aio-pika's ``Message(...).properties`` makes of the same fields, built directly
        (``tests/test_destinations_unit.py`` compares both)."""
        from aiormq import spec

        key = render(self.options.routing_key, fields_of(event))
        body, ctype = data_body(event)
        properties = spec.Basic.Properties(
            content_type=ctype,
            delivery_mode=PERSISTENT,
            headers={f"cloudEvents_{k}": v for k, v in attributes(event).items()},
            message_id=event.id,
            message_type=event.type,
            priority=0,
            timestamp=event.time,
        )
        return body, properties, key

    async def _send(self, event: Event) -> None:
        body, properties, key = self._message(event)
        # ``wait=False`` (aio-pika's ``Exchange.publish`` waits): the confirm is awaited
        # all the same, but the channel lock is not held until the frames are written,
        # so a batch's publishes queue at once instead of taking turns through the
        # writer task, which then writes them all in one step.
        await self._channel.basic_publish(
            body,
            exchange=self._exchange,
            routing_key=key,
            properties=properties,
            mandatory=True,
            wait=False,
        )

    def is_permanent(self, exc: Exception) -> bool:
        from aio_pika.exceptions import ChannelNotFoundEntity, PublishError
        from aiormq.exceptions import ChannelAccessRefused

        # Missing exchange, refused access, unroutable (no queue bound): 404/403/312.
        permanent = (ChannelNotFoundEntity, ChannelAccessRefused, PublishError)
        return isinstance(exc, permanent) or super().is_permanent(exc)

    def drops_connection(self, exc: Exception) -> bool:
        from aio_pika.exceptions import PublishError

        return not isinstance(exc, PublishError)  # a returned message leaves the channel open


@functools.cache
def _classes() -> tuple[Any, Any]:
    """aiormq's ``Connection`` and ``TransportFactory`` as this driver uses them."""
    import aiormq

    class Connection(aiormq.Connection):  # type: ignore[misc]
        """A write queue for a whole batch: with aiormq's 10, the eleventh publish waits
        for the writer task, and the rest follow it one per loop step, each in a
        socket write of its own; with room for the batch, the writer task writes it in
        one step, which ``CoalescingWriter`` sends at once."""

        FRAME_BUFFER_SIZE = WRITE_QUEUE

    class CoalescingTransport(aiormq.TransportFactory):  # type: ignore[misc]
        """aiormq's TCP/TLS connection (as its own factories make it) whose writes of
        one event-loop step leave in one socket write (``CoalescingWriter``)."""

        async def create(self, url: Any, **kwargs: Any) -> tuple[Any, Any]:
            provider = kwargs.pop("ssl_context_provider", None)
            ssl = await provider.get_context() if url.scheme == "amqps" else None
            loop = asyncio.get_running_loop()
            # asyncio.open_connection's own steps, with this writer (a second writer over
            # the transport would close it when collected).
            reader = asyncio.StreamReader(limit=2**16, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            try:
                transport, _ = await loop.create_connection(
                    lambda: protocol, url.host, url.port, ssl=ssl, **kwargs
                )
            except OSError as exc:
                raise aiormq.AMQPConnectionError(*exc.args) from exc
            self.writer = CoalescingWriter(transport, protocol, reader, loop)
            return reader, self.writer

    return Connection, CoalescingTransport


class CoalescingWriter(asyncio.StreamWriter):
    """A stream writer that holds what is written until the end of the event-loop step
    and then writes it in one ``transport.write``.

    aiormq's writer task writes each publish's frames with its own ``write`` (so one
    socket ``send`` each: asyncio sets TCP_NODELAY), and it writes every frame queued
    for it in one step: a batch's publishes, queued back to back, leave in a few sends
    instead of one each (and the broker reads them together, confirming several per
    ``Basic.Ack``). Nothing waits longer than the step: the flush is the next callback
    on the loop, and ``drain``, ``write_eof`` and ``close`` flush first."""

    def __init__(
        self,
        transport: Any,
        protocol: Any,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._held: list[bytes] = []
        self._flush_loop = loop

    def write(self, data: Any) -> None:
        if not self._held:
            self._flush_loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Hand what is held to the transport (at once: its own buffer takes the rest)."""
        held, self._held = self._held, []
        if held and not self.transport.is_closing():
            self.transport.write(b"".join(held))

    async def drain(self) -> None:
        self.flush()
        await super().drain()

    def write_eof(self) -> None:
        self.flush()
        super().write_eof()

    def close(self) -> None:
        self.flush()
        super().close()

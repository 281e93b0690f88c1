"""The AMQP 0-9-1 driver (RabbitMQ) over aio-pika: publish to an exchange with a
routing-key template, publisher confirms (an ack means the broker has it), mandatory
routing (a message no queue takes is a permanent failure, not a silent drop).

Format: CloudEvents binary mode, attributes as ``cloudEvents_<name>`` headers (the AMQP
binding's application-property prefix), the data as the body, its type as content type;
``message_id`` is the event id, ``type`` the event type; persistent delivery mode.

A batch (``Driver.send_batch``) is published on the one confirming channel back to
back and its confirms are awaited together: aiormq numbers the publishes in order and
RabbitMQ confirms them as it stores them (often several in one ``Basic.Ack`` with
``multiple``). Each publish still gets its own answer (ack, nack, return), so each
event its own result.
"""

from __future__ import annotations

from typing import Any

from mesh.destinations import DestinationOptions, render
from mesh.envelope import Event
from mesh.registry import Target
from services.egress.drivers.base import Driver, need
from services.egress.drivers.formats import attributes, data_body, fields_of


class AmqpDriver(Driver):
    kind = "amqp"

    def __init__(self, target: Target, url: str) -> None:
        super().__init__(target)
        self.url = url
        self.options = target.options or DestinationOptions()
        self._conn: Any = None
        self._exchange: Any = None
        self._aio_pika: Any = None
        self._channel: Any = None  # aiormq's channel under aio-pika's

    async def _open(self) -> None:
        aio_pika = self._aio_pika = need("aio_pika", self.kind)
        conn = await aio_pika.connect(self.url, timeout=self.target.timeout_s)
        try:
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
            name = self.options.exchange or ""
            # A passive declare: a missing exchange fails here, as a permanent failure.
            self._exchange = (
                await channel.get_exchange(name, ensure=True) if name else channel.default_exchange
            )
            self._channel = await channel.get_underlay_channel()
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def _shut(self) -> None:
        conn, self._conn, self._exchange, self._channel = self._conn, None, None, None
        if conn is not None:
            await conn.close()

    def _message(self, event: Event) -> tuple[Any, str]:
        """The message of one event and its routing key."""
        aio_pika = self._aio_pika or need("aio_pika", self.kind)
        key = render(self.options.routing_key, fields_of(event))
        body, ctype = data_body(event)
        headers = {f"cloudEvents_{k}": v for k, v in attributes(event).items()}
        message = aio_pika.Message(
            body,
            content_type=ctype,
            message_id=event.id,
            type=event.type,
            timestamp=event.time,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        return message, key

    async def _send(self, event: Event) -> None:
        message, key = self._message(event)
        # aiormq's publish (aio-pika's engine; aio-pika's ``Exchange.publish`` calls it
        # with ``wait=True``): the confirm is awaited all the same, but the channel lock
        # is not held until the frames are written, so a batch's publishes queue at once
        # instead of taking turns through the writer task.
        await self._channel.basic_publish(
            message.body,
            exchange=self._exchange.name,
            routing_key=key,
            properties=message.properties,
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

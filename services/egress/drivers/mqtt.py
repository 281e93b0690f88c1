"""The MQTT driver over aiomqtt (paho-mqtt underneath): MQTT 5, a topic template, QoS 1
by default (a send returns once the broker's PUBACK came).

Format: CloudEvents MQTT binding, binary mode (MQTT 5): the attributes as User
Properties named as the attributes are, the data as the payload, its type as the
Content Type property.
"""

from __future__ import annotations

import asyncio
import functools
import math
import struct
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

from mesh.destinations import DestinationOptions, render
from mesh.envelope import Event
from mesh.errors import ValidationError
from mesh.registry import Target
from services.egress.drivers.base import Driver, need
from services.egress.drivers.formats import attributes, data_body, fields_of


class MqttDriver(Driver):
    kind = "mqtt"
    # Mosquitto leaves Nagle on by default (``set_tcp_nodelay false``): the PUBACKs
    # after the first of a burst wait in its socket for our ACK, which our kernel delays
    # (40 ms) when we have nothing more to send. A chunk awaited alone then takes ~44 ms
    # for 16 publishes (2 ms with ``set_tcp_nodelay true``); a second chunk in flight
    # keeps traffic going our way, so the worker keeps two out (``Driver.overlap``).
    overlap = True

    def __init__(self, target: Target, url: str) -> None:
        super().__init__(target)
        self.url = url
        self.options = target.options or DestinationOptions()
        self._client: Any = None

    async def _open(self) -> None:
        aiomqtt = need("aiomqtt", self.kind)
        parts = urlsplit(self.url)
        tls = parts.scheme == "mqtts"
        client = aiomqtt.Client(
            parts.hostname or "localhost",
            parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            identifier=f"mesh-{self.target.name}-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=self.target.timeout_s,
            tls_params=aiomqtt.TLSParameters() if tls else None,
        )
        # A lost connection is reported to us by the next send or connect (and handled
        # there); aiomqtt also keeps it in a future nobody awaits, which asyncio logs when
        # it is collected ("Future exception was never retrieved"). Mark it seen, before
        # connecting (a refused connect sets it too) and after (connecting renews it).
        # aiomqtt logs a warning for every publish made while more than 10 are pending;
        # the egress has up to max_in_flight out by design (bounded by its slots), so
        # that is no news, and a log line per publish cost more CPU than the publish.
        client.pending_calls_threshold = max(10, self.target.max_in_flight)
        _mark_seen(client)
        await client.__aenter__()
        _mark_seen(client)
        self._client = client

    async def _shut(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(None, None, None)

    async def _send(self, event: Event) -> None:
        topic = render(self.options.topic, fields_of(event))
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            raise ValidationError(f"not a topic to publish to: {topic!r}")
        body, ctype = data_body(event)
        props = publish_properties(ctype, list(attributes(event).items()))
        # No timeout of aiomqtt's own (``math.inf``: it then awaits the PUBACK directly
        # instead of through ``asyncio.wait_for``, a task and a timer per publish): every
        # send runs under the driver's deadline already (``send``, ``send_batch``).
        await self._client.publish(
            topic, body, qos=self.options.qos, properties=props, timeout=math.inf
        )


def publish_properties(content_type: str, user: list[tuple[str, str]]) -> Any:
    """A PUBLISH's MQTT 5 properties (Content Type, then the User Properties in order),
    byte for byte what paho's ``Properties.pack`` makes of them, packed here: paho builds
    its name tables for every instance and walks all 27 names to pack one, which cost
    more CPU than the rest of the publish (``tests/test_destinations_mqtt_props.py``)."""
    out = [b"\x03", _utf(content_type)]  # 3: Content Type
    for name, value in user:
        out += (b"\x26", _utf(name), _utf(value))  # 38: User Property (a string pair)
    body = b"".join(out)
    return _packed_class()(_varint(len(body)) + body)


def _varint(n: int) -> bytes:
    """An MQTT Variable Byte Integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


@functools.cache
def _packed_class() -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    class Packed(Properties):  # type: ignore[misc]
        """Properties packed already: paho only calls ``pack`` on a PUBLISH's."""

        _packed: bytes

        def __init__(self, packed: bytes) -> None:  # no name tables: not needed to send
            object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
            object.__setattr__(self, "_packed", packed)

        def pack(self) -> bytes:
            return self._packed

    return Packed


def _mark_seen(client: Any) -> None:
    lost = getattr(client, "_disconnected", None)
    if isinstance(lost, asyncio.Future):
        lost.add_done_callback(_seen)


def _seen(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()

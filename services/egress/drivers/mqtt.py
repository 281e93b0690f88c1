"""The MQTT driver over aiomqtt (paho-mqtt underneath): MQTT 5, a topic template, QoS 1
by default (a send returns once the broker's PUBACK came).

Format: CloudEvents MQTT binding, binary mode (MQTT 5): the attributes as User
Properties named as the attributes are, the data as the payload, its type as the
Content Type property.
"""

from __future__ import annotations

import asyncio
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
        _mark_seen(client)
        await client.__aenter__()
        _mark_seen(client)
        self._client = client

    async def _shut(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(None, None, None)

    async def _send(self, event: Event) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        topic = render(self.options.topic, fields_of(event))
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            raise ValidationError(f"not a topic to publish to: {topic!r}")
        body, ctype = data_body(event)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = ctype
        props.UserProperty = list(attributes(event).items())
        await self._client.publish(
            topic, body, qos=self.options.qos, properties=props, timeout=self.target.timeout_s
        )


def _mark_seen(client: Any) -> None:
    lost = getattr(client, "_disconnected", None)
    if isinstance(lost, asyncio.Future):
        lost.add_done_callback(_seen)


def _seen(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()

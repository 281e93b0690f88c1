"""The MQTT driver over aiomqtt (paho-mqtt underneath): MQTT 5, a topic template, QoS 1
by default (a send returns once the broker's PUBACK came, and fails if its reason code
is a failure: 0x80 and up).

Format: CloudEvents MQTT binding, binary mode (MQTT 5): the attributes as User
Properties named as the attributes are, the data as the payload, its type as the
Content Type property.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
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
    """aiomqtt keeps the connection (connect, auth, TLS, keepalive, disconnect); the
    publishes go to its paho client directly, without aiomqtt's ``publish`` (an event,
    two walks of its pending calls and a selector wake-up for the write, per publish).
    A batch queues all of its PUBLISHes with paho, then one flush writes them corked
    (one segment), and each publish's future ends with its PUBACK's reason code."""

    kind = "mqtt"

    def __init__(self, target: Target, url: str) -> None:
        super().__init__(target)
        self.url = url
        self.options = target.options or DestinationOptions()
        self._client: Any = None
        self._paho: Any = None  # aiomqtt's paho client: the publishes go to it directly
        # The publishes awaiting their PUBACK (PUBCOMP at QoS 2; the write at QoS 0), by
        # packet id: one dict per connection, failed all at once when it is lost.
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

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
        _mark_seen(client, {})
        await client.__aenter__()
        # Installed once connected: from now on paho calls them from this loop's thread
        # (its connect runs in an executor). aiomqtt names its paho client ``_client``
        # (tests/test_destinations_mqtt.py breaks if that changes).
        paho = client._client
        paho.on_publish = self._on_publish
        paho.on_socket_register_write = self._on_register_write
        self._loop = asyncio.get_running_loop()
        acks: dict[int, asyncio.Future[None]] = {}
        self._acks = acks
        _mark_seen(client, acks)
        self._client, self._paho = client, paho

    async def _shut(self) -> None:
        client, self._client, self._paho = self._client, None, None
        _fail_all(self._acks, ConnectionError("connection closed"))
        if client is not None:
            await client.__aexit__(None, None, None)

    async def _send(self, event: Event) -> None:
        await self._begin(event)

    def _begin(self, event: Event) -> asyncio.Future[None]:
        """Queue one PUBLISH with paho (no write yet: the writes of a whole batch go
        out together, ``_flush``); the future ends with its acknowledgement."""
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            topic = render(self.options.topic, fields_of(event))
            if not topic or "+" in topic or "#" in topic or "\0" in topic:
                raise ValidationError(f"not a topic to publish to: {topic!r}")
            body, ctype = data_body(event)
            props = publish_properties(ctype, list(attributes(event).items()))
            if self._paho is None:
                raise ConnectionError("not connected")
            info = self._paho.publish(topic, body, self.options.qos, False, props)
            if info.rc:  # not connected (paho has dropped the socket), or its queue full
                raise ConnectionError(f"could not publish: {_error_string(info.rc)}")
        except Exception as exc:
            ack.set_exception(exc)
            return ack
        self._acks[info.mid] = ack
        return ack

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        ack = self._acks.pop(mid, None)
        if ack is None or ack.done():
            return  # abandoned at the deadline (cancelled), or failed with the connection
        if reason.value >= 0x80:  # MQTT 5: 0x80 and up are failures (PUBACK's reason code)
            ack.set_exception(PublishRefused(reason.value, str(reason)))
        else:  # 0x00 success, 0x10 no matching subscribers: the broker has it
            ack.set_result(None)

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        # paho asks for a write when a packet is queued and none was pending: flush once
        # the batch has queued all of its publishes (later in this loop turn), instead of
        # aiomqtt's selector round (add_writer, a wake-up, remove_writer) per burst.
        try:
            asyncio.get_running_loop().call_soon(self._flush, client)
        except RuntimeError:  # not from the loop's thread (none expected): hand it over
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._flush, client)

    def _lost(self, exc: Exception) -> None:
        lost = getattr(self._client, "_disconnected", None)
        if isinstance(lost, asyncio.Future) and not lost.done():
            lost.set_exception(exc)

    def _flush(self, client: Any) -> None:
        """Write what paho has queued (paho's ``loop_write``: one ``send`` per packet),
        corked into one segment where the kernel allows (TCP_CORK).

        Then TCP_QUICKACK: Mosquitto leaves Nagle on (``set_tcp_nodelay false``), so of
        a burst's PUBACKs only the first goes out until we acknowledge it, which our
        kernel delays (40 ms) while we have nothing to send; a batch awaited alone took
        ~44 ms for 16 publishes. Quick-ack mode acknowledges the PUBACKs at once: 0.9 ms
        for 16, 2.2 ms for 32 (docs/PERFORMANCE.md, "Session 9: MQTT through paho
        directly")."""
        sock = client.socket()
        if sock is None:
            return
        _cork(sock, True)
        try:
            client.loop_write()  # an error is paho's to handle: it closes, on_disconnect
        except Exception as exc:  # reported as aiomqtt's own callback does
            self._lost(exc)
        finally:
            _cork(sock, False)
            _quickack(sock)
        if client.want_write() and client.socket() is sock:
            # The kernel's buffer is full: finish when it has room, as aiomqtt does.
            loop = asyncio.get_running_loop()
            loop.add_writer(sock.fileno(), self._flush_when_writable, client, sock)

    def _flush_when_writable(self, client: Any, sock: Any) -> None:
        asyncio.get_running_loop().remove_writer(sock.fileno())
        self._flush(client)

    def is_permanent(self, exc: Exception) -> bool:
        if isinstance(exc, PublishRefused):
            return exc.code in PERMANENT
        return super().is_permanent(exc)

    def drops_connection(self, exc: Exception) -> bool:
        return not isinstance(exc, PublishRefused)  # the broker answered: it is up


# PUBACK reason codes that no retry can fix: the broker refuses this topic or payload.
PERMANENT = frozenset({0x87, 0x90, 0x95, 0x99})  # not authorized, topic name invalid,
# packet too large, payload format invalid (0x80, 0x83, 0x91, 0x97 are retried)


class PublishRefused(Exception):
    """The broker answered a PUBLISH with a failure reason code (MQTT 5: 0x80 and up)."""

    def __init__(self, code: int, name: str) -> None:
        super().__init__(f"PUBACK reason code 0x{code:02x}: {name}")
        self.code = code


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


def _mark_seen(client: Any, acks: dict[int, asyncio.Future[None]]) -> None:
    """Mark aiomqtt's lost-connection future seen, and fail ``acks`` when it ends."""
    lost = getattr(client, "_disconnected", None)
    if isinstance(lost, asyncio.Future):
        lost.add_done_callback(functools.partial(_seen, acks))


def _seen(acks: dict[int, asyncio.Future[None]], fut: asyncio.Future[None]) -> None:
    error = None if fut.cancelled() else fut.exception()
    _fail_all(acks, ConnectionError(f"connection lost: {error or 'disconnected'}"))


def _fail_all(acks: dict[int, asyncio.Future[None]], error: Exception) -> None:
    """Fail every publish still awaiting its acknowledgement (a retry, not a hang)."""
    pending = list(acks.values())
    acks.clear()
    for ack in pending:
        if not ack.done():
            ack.set_exception(error)


def _cork(sock: Any, on: bool) -> None:
    if CORK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, CORK, 1 if on else 0)


def _quickack(sock: Any) -> None:
    if QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)


QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux; elsewhere paho's writes as is


def _error_string(rc: int) -> str:
    from paho.mqtt.client import error_string

    return str(error_string(rc))

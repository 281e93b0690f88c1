"""What a consumer gets: ``Delivery`` (one event to ack), the reading of a message's
headers (``MessageHeaders``), the event in a message (``decode_event``), and
``Deliveries``: what every delivering process (``MeshClient.consume``, the egress, the
bridge, the sink, the CLI's operator commands) does around a delivery: pull, decode, the
route check, delivery records, dead letters, admission (``admit``: decode, route check,
dead letter or skip with its record), queue and DLQ depths. The route check itself is
``mesh/routing.py``; the pull loop is ``JetStreamPort.pull`` (``mesh/_nats/pull.py``).

``Deliveries`` is built from plain parts (the port, the subject and stream names, the
settings, a key-ring getter, the route cache), never from a ``MeshClient``: a client
composes one (``client.deliveries``) and a service is handed it (issue #24).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from mesh import envelope
from mesh._nats.pubpipe import ack_error
from mesh._nats.types import Msg
from mesh.crypto import KeyRing
from mesh.envelope import Event
from mesh.errors import BrokerError, DecodeError
from mesh.records import DeliveryRecord, Outcome, dead_letter_headers
from mesh.routing import Verdict
from mesh.subjects import Subjects, split_source

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort
    from mesh.config import Settings
    from mesh.registry import Target
    from mesh.routing import RouteCache
    from mesh.streams import StreamNames

log = structlog.get_logger("mesh.client")  # the client's logger, as before the split


class MessageHeaders:
    """The mesh's reading of a message's headers (the names are ``mesh.envelope``'s):
    consume, the egress, the bridge, the sink's rows, replay and the DLQ tools use it."""

    __slots__ = ("raw",)

    def __init__(self, headers: Mapping[str, str] | None) -> None:
        self.raw: Mapping[str, str] = headers or {}

    @classmethod
    def of(cls, msg: Any) -> MessageHeaders:
        return cls(msg.headers)

    def event_id(self, seq: int | None = None, fallback: str | None = None) -> str:
        """The event's id (``envelope.event_id_of``: the one derivation)."""
        return envelope.event_id_of(self.raw, seq, fallback)

    @property
    def is_cloudevent(self) -> bool:
        """Whether the message carries CloudEvents attributes (a plain one has none)."""
        return envelope.H_ID in self.raw

    @property
    def id(self) -> str | None:
        return self.raw.get(envelope.H_ID)

    @property
    def source(self) -> str | None:
        return self.raw.get(envelope.H_SOURCE)

    @property
    def type(self) -> str | None:
        return self.raw.get(envelope.H_TYPE)

    @property
    def specversion(self) -> str | None:
        return self.raw.get(envelope.H_SPECVERSION)

    @property
    def time(self) -> str | None:
        return self.raw.get(envelope.H_TIME)

    @property
    def datacontenttype(self) -> str | None:
        return self.raw.get(envelope.H_DATACONTENTTYPE)

    @property
    def subject(self) -> str | None:
        return self.raw.get(envelope.H_SUBJECT)

    @property
    def origin(self) -> str | None:
        return self.raw.get(envelope.H_ORIGIN)

    @property
    def hops_text(self) -> str:
        return self.raw.get(envelope.H_HOPS, "0")

    @property
    def hops(self) -> int:
        """The hop count; 0 when missing or not an integer."""
        try:
            return int(self.hops_text)
        except ValueError:
            return 0

    @property
    def traceparent(self) -> str | None:
        return self.raw.get(envelope.H_TRACEPARENT)

    @property
    def tracestate(self) -> str | None:
        return self.raw.get(envelope.H_TRACESTATE)


@dataclass
class Delivery:
    """One event handed to a consumer; ack it once the work is durable."""

    event: Event
    msg: Msg
    target: str

    @property
    def attempt(self) -> int:
        return int(self.msg.metadata.num_delivered or 1)

    async def ack(self) -> None:
        await self.msg.ack_sync()

    async def nak(self, delay: float | None = None) -> None:
        await self.msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self.msg.in_progress()

    async def term(self) -> None:
        await self.msg.term()


def decode_event(
    msg: Msg, keyring: KeyRing | None, subjects: Subjects, seq: int | None = None
) -> Event:
    """The event in a message of the events stream; ``seq`` defaults to the stream
    sequence in the message's JetStream metadata. Raises DecodeError."""
    if seq is None and msg.reply:
        with contextlib.suppress(Exception):  # not a JetStream delivery: no sequence
            seq = msg.metadata.sequence.stream if msg.metadata.sequence else None
    return envelope.decode(msg.subject, msg.headers, msg.data, keyring, seq=seq, subjects=subjects)


class Deliveries:
    """Pull, decode, route-check, record and dead-letter deliveries: the services' side of
    the mesh, apart from ``MeshClient``'s user API. ``keyring`` is called at each decode
    (a client's ``keyring_or_none``: the key file is read once, when first needed);
    ``settings`` is read at each check (``max_hops``); ``instance`` names the process in
    the delivery records it writes. ``routes`` comes with the registry: a client sets it
    on connect."""

    def __init__(
        self,
        port: JetStreamPort,
        subjects: Subjects,
        names: StreamNames,
        settings: Settings,
        keyring: Callable[[], KeyRing | None],
        routes: RouteCache | None,
        instance: str,
    ) -> None:
        self.port = port
        self.subjects = subjects
        self.names = names
        self.settings = settings
        self.keyring = keyring
        self.routes = routes
        self.instance = instance

    # The route check ------------------------------------------------------------

    async def check_event(self, target: str, event: Event) -> str | None:
        """Why ``target`` must not get this event (None when it may); no transform runs."""
        verdict = await self.route_event(target, event, transform=False)
        return verdict.skip

    async def route_event(
        self, target: str, event: Event, *, size: int = 0, transform: bool = True
    ) -> Verdict:
        """The one route check (mesh/routing.py): skip, dead-letter, or deliver the
        returned event (its data reshaped by the transforms). ``size``: the encoded size."""
        if event.effective_origin == target:
            return Verdict(skip="loop: the event originated at this target")
        if event.hops > self.settings.max_hops:
            return Verdict(skip=f"hop limit: {event.hops} > {self.settings.max_hops}")
        return await self.by_rules(target, event, size, transform)

    async def by_rules(self, target: str, event: Event, size: int, transform: bool) -> Verdict:
        """The registry's part of the route check (``RouteCache.verdict``)."""
        if self.routes is None:
            raise BrokerError("not connected: no route cache")
        return await self.routes.verdict(target, event, size=size, transform=transform)

    # Records and dead letters ------------------------------------------------------

    async def record(self, rec: DeliveryRecord) -> bool:
        """Publish a delivery-attempt record; True once the broker has stored it (a
        failure is logged, not raised: a caller that must not settle without the record
        hands its message back instead)."""
        try:
            ack = await self.port.publish_acked(
                self.subjects.delivery(rec.target), rec.to_bytes(), {"Nats-Msg-Id": rec.id}, 5.0
            )
            error = ack_error(ack)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        if error is not None:
            log.warning("delivery record not published", target=rec.target, error=error)
            return False
        return True

    async def dead_letter(self, msg: Msg, target: str, error: str, attempts: int) -> None:
        """Copy a message to the DLQ with its reason. Raises if the DLQ did not take it."""
        headers = dead_letter_headers(msg.subject, msg.headers, target, error, attempts)
        await self.port.publish(self.subjects.dlq(target), msg.data, headers=headers, timeout=10)

    # Pulling and admitting ------------------------------------------------------------

    def pull(
        self,
        consumer: str,
        *,
        batch: int = 10,
        expires: float = 2.0,
        stream: str | None = None,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[list[Msg], None]:
        """Fetch batches from a durable consumer forever, surviving broker restarts
        (``JetStreamPort.pull``). Close the generator to give back what it holds."""
        stream = stream or self.names.events
        return self.port.pull(stream, consumer, batch=batch, expires=expires, stop=stop)

    def decode(self, msg: Msg, seq: int | None = None) -> Event:
        """The event in a message of the events stream, opened with the mesh's keys.

        ``seq`` defaults to the stream sequence in the message's JetStream metadata.
        Raises DecodeError.
        """
        return decode_event(msg, self.keyring(), self.subjects, seq)

    async def admit(self, target: str, msg: Msg) -> Delivery | None:
        """Decode and check one message for ``target``; dead-letter or skip what must not
        be handed out, with its delivery record."""
        try:
            event = self.decode(msg)
        except DecodeError as exc:
            attempts = int(msg.metadata.num_delivered or 1)
            await self.dead_letter(msg, target, f"undecodable: {exc}", attempts)
            await msg.ack_sync()
            return None
        verdict = await self.route_event(target, event, size=len(msg.data))
        if verdict.dead is not None:
            attempts = int(msg.metadata.num_delivered or 1)
            await self.dead_letter(msg, target, verdict.dead, attempts)
            await msg.ack_sync()
            await self.record(
                DeliveryRecord(
                    event_id=event.id,
                    target=target,
                    attempt=attempts,
                    outcome=Outcome.DEAD,
                    error=verdict.dead,
                    instance=self.instance,
                    tenant=split_source(event.source)[0],
                )
            )
            return None
        if verdict.event is None:
            await self.record(
                DeliveryRecord(
                    event_id=event.id,
                    target=target,
                    attempt=0,
                    outcome=Outcome.SKIPPED,
                    error=verdict.skip,
                    instance=self.instance,
                    tenant=split_source(event.source)[0],
                )
            )
            await msg.ack_sync()
            return None
        return Delivery(event=verdict.event, msg=msg, target=target)

    # Depths ------------------------------------------------------------------------

    async def dlq_depths(self) -> dict[str, int]:
        """Dead letters retained, per target."""
        return await self.port.dlq_depths(self.names.dlq, self.subjects.dlq_all)

    async def queue_depth(self, target: Target) -> dict[str, Any]:
        """A target's queue: lag = pending (not yet delivered) + unacked (in flight)."""
        return await self.port.queue_depth(self.names.events, target.consumer)

"""What a consumer gets: ``Delivery`` (one event to ack), the reading of a message's
headers (``MessageHeaders``), the event in a message (``decode_event``) and the
admission of each pulled message (``admit``: decode, route check, dead letter or skip
with its record). The route check itself is ``mesh/routing.py``; the pull loop is
``JetStreamPort.pull`` (``mesh/_nats/pull.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from mesh import envelope
from mesh._nats.types import Msg
from mesh.crypto import KeyRing
from mesh.envelope import Event
from mesh.errors import DecodeError
from mesh.records import DeliveryRecord, Outcome
from mesh.routing import Verdict
from mesh.subjects import Subjects, split_source

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


async def admit(
    msg: Msg,
    target: str,
    decode: Callable[[Msg], Event],
    route: Callable[..., Awaitable[Verdict]],
    dead_letter: Callable[[Msg, str, str, int], Awaitable[None]],
    record: Callable[[DeliveryRecord], Awaitable[object]],
    instance: str,
) -> Delivery | None:
    """Decode and check one message for ``target`` (``route`` is ``MeshClient.route_event``);
    dead-letter or skip what must not be handed out, with its delivery record."""
    try:
        event = decode(msg)
    except DecodeError as exc:
        attempts = int(msg.metadata.num_delivered or 1)
        await dead_letter(msg, target, f"undecodable: {exc}", attempts)
        await msg.ack_sync()
        return None
    verdict = await route(target, event, size=len(msg.data))
    if verdict.dead is not None:
        attempts = int(msg.metadata.num_delivered or 1)
        await dead_letter(msg, target, verdict.dead, attempts)
        await msg.ack_sync()
        await record(
            DeliveryRecord(
                event_id=event.id,
                target=target,
                attempt=attempts,
                outcome=Outcome.DEAD,
                error=verdict.dead,
                instance=instance,
                tenant=split_source(event.source)[0],
            )
        )
        return None
    if verdict.event is None:
        await record(
            DeliveryRecord(
                event_id=event.id,
                target=target,
                attempt=0,
                outcome=Outcome.SKIPPED,
                error=verdict.skip,
                instance=instance,
                tenant=split_source(event.source)[0],
            )
        )
        await msg.ack_sync()
        return None
    event = verdict.event
    return Delivery(event=event, msg=msg, target=target)

"""What a consumer gets: ``Delivery`` (one event to ack), the event in a message
(``decode_event``), the pull loop behind ``MeshClient.pull`` and ``consume``, and the
admission of each pulled message (``admit``: decode, route check, dead letter or skip
with its record). The route check itself is ``mesh/routing.py``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import nats.errors as nats_errors
import nats.js.errors as js_errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import envelope
from mesh.crypto import KeyRing
from mesh.envelope import Event
from mesh.errors import DecodeError
from mesh.pullfeed import PullFeed
from mesh.records import DeliveryRecord, Outcome
from mesh.routing import Verdict
from mesh.subjects import Subjects, split_source

log = structlog.get_logger("mesh.client")  # the client's logger, as before the split

# Consecutive failed fetches (not timeouts) before the pull subscription is re-created.
PULL_RESUBSCRIBE_AFTER = 5


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


def raise_if_cancelled() -> None:
    """Raise CancelledError when this task was asked to stop, even if the request was lost.

    nats.py waits for messages through ``asyncio.wait_for``, which on Python 3.11 drops a
    cancellation that races with the awaited thing finishing (CPython gh-86296): a fetch
    cancelled just as its 408 "request timeout" arrives returns as a timeout. A loop that
    retries on timeouts would then run on, and the caller that cancelled it (``wait_for``
    around ``anext``, a service stopping) would wait for it forever. ``Task.cancelling()``
    still counts the request.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pull_batches(
    nc: NATS,
    stream: str,
    consumer: str,
    *,
    batch: int = 10,
    expires: float = 2.0,
    stop: asyncio.Event | None = None,
) -> AsyncGenerator[list[Msg], None]:
    """Fetch batches from a durable consumer forever, surviving broker restarts.

    Every fetch sends a fresh pull request, so a loop survives a server
    restart (nats.py #504 is a pull subscription that waits on a request the
    restarted server forgot). The subscription itself is kept across
    reconnects: nats.py re-subscribes its inbox, and a new inbox would strand
    whatever the server sends to a request made through the old one until
    ack_wait. It is re-created only when the consumer is gone or fetches keep
    failing.
    """
    feed: PullFeed | None = None
    backoff = 0.1
    failures = 0
    try:
        while stop is None or not stop.is_set():
            if nc.is_closed:
                return
            try:
                if feed is None:
                    feed = await PullFeed(nc, stream, consumer).open()
                msgs = await feed.fetch(batch, timeout=expires)
                backoff = 0.1
                failures = 0
            except (nats_errors.TimeoutError, TimeoutError):
                raise_if_cancelled()
                continue
            except nats_errors.ConnectionClosedError:
                return
            except (nats_errors.Error, js_errors.Error, OSError) as exc:
                log.debug("pull retry", consumer=consumer, error=str(exc) or type(exc).__name__)
                failures += 1
                gone = isinstance(exc, js_errors.NotFoundError | js_errors.ServiceUnavailableError)
                if feed is not None and (gone or failures >= PULL_RESUBSCRIBE_AFTER):
                    await feed.close()
                    feed = None
                    failures = 0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if msgs:
                yield msgs
    finally:
        # A closed generator (break, aclose) must not leave its inbox subscribed; what
        # arrived for it and was never handed out goes back (nak) at once.
        if feed is not None:
            await feed.close()


async def admit(
    msg: Msg,
    target: str,
    decode: Callable[[Msg], Event],
    route: Callable[..., Awaitable[Verdict]],
    dead_letter: Callable[[Msg, str, str, int], Awaitable[None]],
    record: Callable[[DeliveryRecord], Awaitable[None]],
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

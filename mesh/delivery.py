"""What a consumer gets: ``Delivery`` (one event to ack), the event in a message
(``decode_event``), the route check's cache (``RouteCache``) and the pull loop behind
``MeshClient.pull`` and ``consume``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import nats.errors as nats_errors
import nats.js.errors as js_errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import envelope
from mesh.crypto import KeyRing
from mesh.envelope import Event
from mesh.pullfeed import PullFeed
from mesh.registry import Registry, route_accepts
from mesh.subjects import Subjects

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


class RouteCache:
    """Per-target routes, re-read on a miss when the registry changed since.

    A miss is trusted only at the registry revision the routes were read at: an
    event on a propagation added a moment ago must not be skipped (and acked) by a
    cache that predates it.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._routes: dict[str, list[tuple[str, str | None]]] = {}
        self._revision: dict[str, int] = {}
        self._first: dict[str, asyncio.Lock] = {}

    async def accepts(self, target: str, source: str, event_type: str) -> bool:
        routes = self._routes.get(target)
        if routes is not None and route_accepts(routes, source, event_type):
            return True
        if routes is None:
            # The first read of a target's routes, once: a whole fetched batch misses
            # together (an egress starting on a backlog), and each event reading the
            # registry for itself cost a status request and two KV listings apiece.
            async with self._first.setdefault(target, asyncio.Lock()):
                if target not in self._routes:
                    await self._read(target)
            routes = self._routes[target]
            if route_accepts(routes, source, event_type):
                return True
        # Read the revision before the routes: a change in between makes the next miss
        # look again rather than trust stale routes.
        revision = await self.registry.revision()
        if self._revision.get(target) == revision:
            return False
        await self._read(target, revision)
        return route_accepts(self._routes[target], source, event_type)

    async def _read(self, target: str, revision: int | None = None) -> None:
        if revision is None:
            revision = await self.registry.revision()
        self._routes[target] = await self.registry.routes_for(target)
        self._revision[target] = revision


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

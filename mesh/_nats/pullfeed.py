"""Fetching from a durable pull consumer without a task per message.

nats.py's ``PullSubscription.fetch`` speaks the right protocol but waits for every
message of a batch with ``next_msg``, which creates two tasks (and a uuid) per message:
on this project's hardware 45-65 us of CPU per fetched message, as much as decrypting,
decoding and signing it together. ``PullFeed`` sends the same pull request
(``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` with ``batch``, ``expires`` and
``no_wait``: the server sends what it has, waiting up to ``expires`` for the first
message, then ends the request with a status) and collects the answers in a callback
on one inbox subscription (a direct one on the mesh's connection, ``MeshNats``: the read
loop hands each message straight to it). The messages are ordinary nats.py ``Msg``
objects: ack, nak, in_progress, term and metadata work as usual.

A message that arrives after its fetch gave up (a late answer to an expired request)
is kept and handed out first by the next fetch, never dropped; ``close`` gives back
(naks) whatever is still kept.

``Deliveries.pull`` (so the egress, the sink, the bridge feeds and ``mesh consume``)
fetches through it: it halves fetch CPU (56 -> 27 us per message, docs/PERFORMANCE.md).
It was held back until the egress bounded what a rate-limited worker holds by its rate
share (services/egress/worker.py, ``RATE_AHEAD_S``): with the faster fetch, two
instances sharing a rate-limited target otherwise split a burst unevenly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque

import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh._nats.headers import MeshNats

STATUS = "Status"
NO_MESSAGES = "404"
REQUEST_TIMEOUT = "408"
CONFLICT = "409"
HEARTBEAT = "100"
NO_RESPONDERS = "503"


class PullFeed:
    """Fetch batches from one durable pull consumer (one inbox, one callback)."""

    def __init__(self, nc: NATS, stream: str, consumer: str, api_prefix: str = "$JS.API") -> None:
        self.nc = nc
        self.stream = stream
        self.consumer = consumer
        self.subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = ""
        self._sub: Subscription | None = None
        self._kept: deque[Msg] = deque()  # delivered, not yet handed out
        self._ended = False  # the current request's status arrived
        self._error: Exception | None = None
        self._wake = asyncio.Event()

    async def open(self) -> PullFeed:
        self.inbox = self.nc.new_inbox()
        if isinstance(self.nc, MeshNats):  # the port's: no queue and task per message
            self._sub = await self.nc.subscribe_direct(self.inbox, self._on_msg)
        else:
            self._sub = await self.nc.subscribe(self.inbox, cb=self._on_msg_async)
        return self

    async def _on_msg_async(self, msg: Msg) -> None:
        self._on_msg(msg)

    def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(STATUS) if headers else None
        if not status:
            self._kept.append(msg)
        elif status == HEARTBEAT:
            return
        elif status in (NO_MESSAGES, REQUEST_TIMEOUT, CONFLICT):
            # The request is over: nothing (more) to send now, or it expired, or the
            # server cut it short (leadership change, max waiting, ...). Fetch again.
            self._ended = True
        elif status == NO_RESPONDERS:
            self._error = js_errors.ServiceUnavailableError(
                description=f"no responders for consumer {self.consumer}"
            )
            self._ended = True
        else:
            try:
                self._error = js_errors.APIError.from_msg(msg)
            except Exception as exc:  # a status nats.py does not know
                self._error = exc
            self._ended = True
        self._wake.set()

    def _take(self, batch: int) -> list[Msg]:
        kept = self._kept
        n = min(batch, len(kept))
        return [kept.popleft() for _ in range(n)]

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages; raises ``nats.errors.TimeoutError`` when none came
        within ``timeout`` (the server's request expires just before)."""
        if self._sub is None:
            raise nats_errors.BadSubscriptionError
        if self._kept:
            # Late answers to an earlier request first: they are ours already.
            return self._take(batch)
        self._ended = False
        self._error = None
        self._wake.clear()
        request: dict[str, int | bool] = {"batch": batch, "no_wait": True}
        # The server ends the request a little before we stop waiting, so its answer
        # (a 408) arrives rather than our timeout firing with the request still open.
        request["expires"] = int((timeout - min(0.1, timeout / 10)) * 1_000_000_000)
        await self.nc.publish(self.subject, json.dumps(request).encode(), reply=self.inbox)
        try:
            async with asyncio.timeout(timeout):
                while len(self._kept) < batch and not self._ended:
                    await self._wake.wait()
                    self._wake.clear()
        except TimeoutError:
            pass
        if self._kept:
            return self._take(batch)
        if self._error is not None:
            raise self._error
        raise nats_errors.TimeoutError

    async def close(self, hand_back: bool = True) -> None:
        """Unsubscribe; nak (by default) what was delivered and never handed out."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        kept, self._kept = list(self._kept), deque()
        if hand_back:
            for msg in kept:
                with contextlib.suppress(Exception):
                    await msg.nak()

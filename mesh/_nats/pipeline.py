"""Pipelined JetStream publishes through nats.py's ``publish_async``, one implementation:
``AckWindow`` keeps at most ``window`` acknowledgements outstanding and counts what the
stream stored new (by a tag: the source) and what it had already; ``publish_pipelined``
(``MeshClient.publish_many``) hands it a list in chunks, replay one message at a time.

Messages go to the connection in chunks without yielding in between, so one socket
write carries a chunk (with a stall timeout, nats.py's ``publish_async`` yields, and so
writes, per message; a stall is bounded by ``asyncio.timeout`` instead). Every message
is acknowledged by the stream or the publish fails with a ``BrokerError``; nothing is
counted before its acknowledgement.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.js import JetStreamContext

from mesh.envelope import Event
from mesh.errors import BrokerError, PayloadTooLarge
from mesh.observability import METRICS
from mesh.publishing import Encoded

PUBLISH_CHUNK = 64  # messages publish_many hands to the connection per loop turn
PUBLISH_TIMEOUT_S = 10.0
PUBLISH_WINDOW = 1024


async def publish_pipelined(
    js: JetStreamContext,
    events: list[Event],
    encode: Callable[[Event], Encoded],
    max_payload: int,
    *,
    window: int = PUBLISH_WINDOW,
    timeout: float = PUBLISH_TIMEOUT_S,
) -> int:
    """Publish ``events``, each encoded by ``encode``; returns how many were new (not
    duplicates). Raises ``BrokerError`` when the broker refuses a message or stops
    answering; everything published before that stays published."""
    pipe = AckWindow(js, window, timeout)
    chunk = min(PUBLISH_CHUNK, pipe.window)
    try:
        for start in range(0, len(events), chunk):
            messages = [encode(event) for event in events[start : start + chunk]]
            await pipe.room(len(messages))
            body = b""
            try:
                async with asyncio.timeout(timeout):
                    for nats_subject, headers, body, source in messages:
                        await pipe.send(nats_subject, body, headers, source)
            except (TimeoutError, js_errors.TooManyStalledMsgsError):
                raise BrokerError(f"publish stalled for {timeout}s") from None
            except nats_errors.MaxPayloadError:
                raise PayloadTooLarge(len(body), max_payload) from None
            await asyncio.sleep(0)  # the flusher writes this chunk in one go
        await pipe.finish()
    finally:
        pipe.abandon()
        for source, n in pipe.new.items():
            METRICS.events_published.labels(source).inc(n)
    return sum(pipe.new.values())


class AckWindow:
    """Publishes in order with at most ``window`` acknowledgements outstanding; ``new``
    counts what the stream stored new by tag, ``duplicates`` what it had already."""

    def __init__(
        self, js: JetStreamContext, window: int = PUBLISH_WINDOW, timeout: float = PUBLISH_TIMEOUT_S
    ) -> None:
        self.js = js
        self.window = max(1, window)
        self.timeout = timeout
        self.new: Counter[str] = Counter()
        self.duplicates = 0
        self._out: deque[tuple[asyncio.Future[Any], str]] = deque()

    @property
    def counted(self) -> int:
        return sum(self.new.values()) + self.duplicates

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str], tag: str = ""
    ) -> None:
        """One message, waiting first for room in the window (the oldest half settles)."""
        if len(self._out) >= self.window:
            await self._collect(max(1, len(self._out) // 2))
        try:
            async with asyncio.timeout(self.timeout):
                await self.send(subject, body, headers, tag)
        except (TimeoutError, js_errors.TooManyStalledMsgsError):
            raise BrokerError(f"publish stalled for {self.timeout}s") from None

    async def room(self, n: int) -> None:
        """Settle the oldest acknowledgements until ``n`` more messages fit."""
        await self._collect(len(self._out) + n - self.window)

    async def send(self, subject: str, body: bytes, headers: dict[str, str], tag: str) -> None:
        """Hand one message to the connection (the caller keeps to the window)."""
        fut = await self.js.publish_async(subject, body, headers=headers)
        self._out.append((fut, tag))

    async def finish(self) -> None:
        await self._collect(len(self._out))

    async def _collect(self, n: int) -> None:
        """Wait for the oldest ``n`` acknowledgements and count them."""
        if n <= 0:
            return
        oldest = [self._out.popleft() for _ in range(min(n, len(self._out)))]
        _, late = await asyncio.wait([fut for fut, _ in oldest], timeout=self.timeout)
        error: BrokerError | None = None
        if late:
            error = BrokerError(
                f"{len(late)} publish acknowledgements timed out after {self.timeout}s"
            )
        for fut, tag in oldest:
            if error is not None:
                fut.add_done_callback(_retrieve)
                continue
            exc = fut.exception()
            if isinstance(exc, js_errors.NoStreamResponseError):
                error = BrokerError(
                    "no stream stores mesh events: run `mesh init` (or `mesh up`) first"
                )
            elif exc is not None:
                why = getattr(exc, "description", None) or exc
                error = BrokerError(f"publish refused: {why}")
            elif fut.result().duplicate:
                self.duplicates += 1
            else:
                self.new[tag] += 1
        if error is not None:
            raise error

    def abandon(self) -> None:
        """After an error or an interrupt: nothing outstanding is waited for (and no
        "exception never retrieved" from what is still to come)."""
        while self._out:
            fut, _ = self._out.popleft()
            fut.add_done_callback(_retrieve)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (asyncio logs unretrieved ones)."""
    if not fut.cancelled():
        fut.exception()

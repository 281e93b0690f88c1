"""Pipelined JetStream publishes through nats.py's ``publish_async``: ``publish_pipelined``
(``MeshClient.publish_many``) and ``AckWindow`` (replay, one message at a time).

Messages go to the connection in chunks without yielding in between, so one socket
write carries a chunk (with a stall timeout, nats.py's ``publish_async`` yields, and so
writes, per message). At most ``window`` acknowledgements are outstanding.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

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
    window: int = 1024,
    timeout: float = 10.0,
) -> int:
    """Publish ``events``, each encoded by ``encode``; returns how many were new (not
    duplicates). Raises ``BrokerError`` when the broker refuses a message or stops
    answering; everything published before that stays published."""
    window = max(1, window)
    chunk = min(PUBLISH_CHUNK, window)
    outstanding: deque[tuple[asyncio.Future[Any], str]] = deque()
    new: Counter[str] = Counter()
    try:
        for start in range(0, len(events), chunk):
            messages = [encode(event) for event in events[start : start + chunk]]
            excess = len(outstanding) + len(messages) - window
            if excess > 0:
                await _collect(outstanding, excess, timeout, new)
            try:
                async with asyncio.timeout(timeout):
                    for nats_subject, headers, body, source in messages:
                        fut = await js.publish_async(nats_subject, body, headers=headers)
                        outstanding.append((fut, source))
            except (TimeoutError, js_errors.TooManyStalledMsgsError):
                raise BrokerError(f"publish stalled for {timeout}s") from None
            except nats_errors.MaxPayloadError:
                raise PayloadTooLarge(len(body), max_payload) from None
            await asyncio.sleep(0)  # the flusher writes this chunk in one go
        await _collect(outstanding, len(outstanding), timeout, new)
    finally:
        for fut, _ in outstanding:  # after an error: no "exception never retrieved"
            fut.add_done_callback(_retrieve)
        for source, n in new.items():
            METRICS.events_published.labels(source).inc(n)
    return sum(new.values())


async def _collect(
    outstanding: deque[tuple[asyncio.Future[Any], str]],
    n: int,
    timeout: float,
    new: Counter[str],
) -> None:
    """Wait for the oldest ``n`` acknowledgements; count the new events by source."""
    if n <= 0:
        return
    oldest = [outstanding.popleft() for _ in range(n)]
    _, late = await asyncio.wait([fut for fut, _ in oldest], timeout=timeout)
    error: BrokerError | None = None
    if late:
        error = BrokerError(f"{len(late)} publish acknowledgements timed out after {timeout}s")
    for fut, source in oldest:
        if error is not None:
            fut.add_done_callback(_retrieve)
            continue
        exc = fut.exception()
        if isinstance(exc, js_errors.NoStreamResponseError):
            error = BrokerError(
                "no stream stores mesh events: run `mesh init` (or `mesh up`) first"
            )
        elif exc is not None:
            error = BrokerError(f"publish refused: {exc}")
        elif not fut.result().duplicate:
            new[source] += 1
    if error is not None:
        raise error


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (asyncio logs unretrieved ones)."""
    if not fut.cancelled():
        fut.exception()


class AckWindow:
    """Publishes in order with up to ``window`` acknowledgements outstanding.

    Every message is acknowledged by the stream (counted new or duplicate) or the
    replay fails with a ``BrokerError``; nothing is reported done before its ack.
    """

    def __init__(self, js: JetStreamContext, window: int = PUBLISH_WINDOW) -> None:
        self.js = js
        self.window = window
        self.futures: deque[asyncio.Future[PubAck]] = deque()

    async def publish(self, subject: str, body: bytes, headers: dict[str, str]) -> tuple[int, int]:
        try:
            fut = await self.js.publish_async(
                subject, body, headers=headers, wait_stall=PUBLISH_TIMEOUT_S
            )
        except js_errors.TooManyStalledMsgsError:
            raise BrokerError("replay publish acknowledgements timed out") from None
        self.futures.append(fut)
        if len(self.futures) < self.window:
            return 0, 0
        return await self._settle(len(self.futures) // 2)

    async def finish(self) -> tuple[int, int]:
        return await self._settle(len(self.futures))

    async def _settle(self, n: int) -> tuple[int, int]:
        new = dup = 0
        try:
            for _ in range(n):
                ack = await asyncio.wait_for(self.futures[0], PUBLISH_TIMEOUT_S)
                self.futures.popleft()
                if ack.duplicate:
                    dup += 1
                else:
                    new += 1
        except (TimeoutError, nats_errors.TimeoutError):
            self.abandon()
            raise BrokerError("replay publish acknowledgements timed out") from None
        except js_errors.APIError as exc:
            self.abandon()
            raise BrokerError(f"replay publish refused: {exc.description or exc}") from None
        return new, dup

    def abandon(self) -> None:
        while self.futures:
            fut = self.futures.popleft()
            if not fut.done():
                fut.cancel()

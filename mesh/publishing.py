"""Building and publishing events: ``build_event`` and the size check behind
``MeshClient.build`` and ``publish``, and the pipelined ``publish_many``.

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

from mesh import envelope
from mesh.envelope import Event
from mesh.errors import BrokerError, PayloadTooLarge, ValidationError
from mesh.observability import METRICS
from mesh.subjects import validate_source, validate_type

PUBLISH_CHUNK = 64  # messages publish_many hands to the connection per loop turn

#: One encoded event: ``(NATS subject, headers, body, source)``.
Encoded = tuple[str, dict[str, str], bytes, str]


def build_event(
    source: str,
    event_type: str,
    data: Any = None,
    *,
    id: str | None = None,
    subject: str | None = None,
    datacontenttype: str | None = None,
    cause: Event | None = None,
) -> Event:
    """A new event from a checked source (a name, or a tenant's ``~T.name``), type and
    id; raises ``ValidationError``."""
    validate_source(source)
    validate_type(event_type)
    event = Event(source=source, type=event_type, data=data, subject=subject)
    if datacontenttype:
        event.datacontenttype = datacontenttype
    elif isinstance(data, bytes | bytearray):
        event.datacontenttype = envelope.OCTETS
    if id is not None:
        if not id or len(id) > 128 or any(c.isspace() for c in id):
            raise ValidationError("an event id is 1-128 characters without spaces")
        event.id = id
    if cause is not None:
        event.origin = cause.effective_origin
        event.hops = cause.hops + 1
    return event


def check_size(nats_subject: str, headers: dict[str, str], body: bytes, max_payload: int) -> None:
    """Raise ``PayloadTooLarge`` for a message the server would refuse."""
    size = (
        len(body)
        + len(nats_subject)
        + sum(map(len, headers))
        + sum(map(len, headers.values()))
        + 4 * len(headers)
    )
    if size > max_payload:
        raise PayloadTooLarge(size, max_payload)


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

"""Replay: re-inject a target's past events so that only that target receives them again.

Events are read from the target's *source* subjects (``<prefix>.evt.<source>.>``
as its propagations route them) starting at a time, with a short-lived
unacknowledged consumer, and republished on
``<prefix>.replay.<target>.<source>.<type>``. That subject is in the target's
``deliver-<target>`` filter and in no other consumer's, so the event goes
through normal delivery again (fresh attempts, same receivers' dedupe) for that
target only. It works for a target registered after the events were published.

A replayed message keeps the original headers and (still encrypted) body, hence
the original ``ce-id``, and carries ``ce-meshreplay: true``. Its
``Nats-Msg-Id`` is ``replay-<target>-<id>``: different from the original's (or
the stream would drop it as a duplicate) and the same on every run, so that an
interrupted replay run again within the duplicate window is stored once; past
the window receivers still dedupe on the id.

``scan`` (reading a stream range without disturbing anything) is shared with
the DLQ and key tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck

from mesh import envelope
from mesh.client import MeshClient
from mesh.delivery import raise_if_cancelled
from mesh.errors import BrokerError, NotFound, ValidationError
from mesh.registry import route_accepts
from mesh.subjects import (
    Subjects,
    collide,
    reduce_filters,
    subject_matches,
    subsumes,
    validate_pattern,
)

SCAN_BATCH = 512
SCAN_FETCH_TIMEOUT_S = 1.0
SCAN_INACTIVE_S = 60.0
PUBLISH_TIMEOUT_S = 10.0
PUBLISH_WINDOW = 1024
SAMPLE_SIZE = 20


# Reading a stream range ------------------------------------------------------------


async def scan(
    js: JetStreamContext,
    stream: str,
    filters: list[str],
    *,
    start_time: datetime | None = None,
    start_seq: int | None = None,
    batch: int = SCAN_BATCH,
    on_total: Callable[[int], None] | None = None,
) -> AsyncIterator[Msg]:
    """Yield the stream's messages on ``filters`` from ``start_time`` or ``start_seq``
    (or the start).

    Reads through an ephemeral, unacknowledged pull consumer (nothing durable is
    disturbed) and stops at the stream's last message as it was when the scan
    began, so writing to the same stream while scanning cannot make it endless.
    ``on_total`` is told how many messages the range holds (an upper bound).
    """
    if not filters:
        return
    try:
        info = await js.stream_info(stream)
    except js_errors.NotFoundError:
        raise BrokerError(f"stream {stream} does not exist: run `mesh init`") from None
    last_seq = info.state.last_seq
    if not info.state.messages or not last_seq:
        if on_total:
            on_total(0)
        return
    by_seq = DeliverPolicy.BY_START_SEQUENCE if start_seq else DeliverPolicy.ALL
    cfg = ConsumerConfig(
        description="mesh scan (ephemeral)",
        deliver_policy=DeliverPolicy.BY_START_TIME if start_time else by_seq,
        opt_start_time=start_time,
        opt_start_seq=start_seq if not start_time else None,
        ack_policy=AckPolicy.NONE,
        filter_subjects=list(filters),
        inactive_threshold=SCAN_INACTIVE_S,
        mem_storage=True,
        num_replicas=1,
        max_waiting=1,
    )
    try:
        ci = await js.add_consumer(stream, cfg)
    except js_errors.Error as exc:
        raise BrokerError(f"cannot read {stream}: {exc.description or exc}") from None
    name = ci.name
    if on_total:
        on_total(int(ci.num_pending or 0))
    if not ci.num_pending:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
        return
    sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=SCAN_FETCH_TIMEOUT_S)
            except (nats_errors.TimeoutError, TimeoutError):
                raise_if_cancelled()
                # Nothing came: finished when the consumer has nothing pending.
                try:
                    ci = await js.consumer_info(stream, name)
                except (nats_errors.Error, js_errors.Error) as exc:
                    raise _lost(stream, exc) from None
                if not ci.num_pending:
                    return
                continue
            except (nats_errors.Error, js_errors.Error) as exc:
                raise _lost(stream, exc) from None
            for msg in msgs:
                meta = msg.metadata
                if meta.sequence.stream > last_seq:
                    return
                yield msg
                if meta.sequence.stream >= last_seq or meta.num_pending == 0:
                    return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)


def _lost(stream: str, exc: Exception) -> BrokerError:
    why = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return BrokerError(f"reading {stream} was interrupted ({why}); running it again is safe")


# Replay headers ---------------------------------------------------------------------


def event_id_of(headers: Mapping[str, str], seq: int | None) -> str:
    """The id a receiver sees for this message (as ``envelope.decode`` derives it)."""
    return headers.get("ce-id") or headers.get(envelope.H_MSG_ID) or f"seq-{seq}"


def replay_headers(
    headers: Mapping[str, str] | None,
    body: bytes,
    *,
    source: str,
    event_type: str,
    msg_id: str,
    seq: int | None = None,
) -> dict[str, str]:
    """Headers for the replayed copy: the originals, marked as a replay, with a new msg id.

    A plain message (no ``ce-*`` headers, e.g. from ``nats pub``) gets the
    CloudEvents attributes its receivers derived before, so that its id and
    data read the same after the replay.
    """
    original = dict(headers or {})
    out = {
        k: v
        for k, v in original.items()
        if not k.startswith("mesh-dlq-") and not k.lower().startswith("nats-")
    }
    if "ce-id" not in out:
        out.update(
            {
                "ce-specversion": envelope.SPECVERSION,
                "ce-id": event_id_of(original, seq),
                "ce-source": source,
                "ce-type": event_type,
            }
        )
        if envelope.H_ENCRYPTION not in out:
            try:
                json.loads(body) if body else None
                out["ce-datacontenttype"] = envelope.JSON
            except (ValueError, UnicodeDecodeError):
                out["ce-datacontenttype"] = envelope.OCTETS
    out[f"ce-{envelope.EXT_REPLAY}"] = "true"
    out[envelope.H_MSG_ID] = msg_id
    return out


def replay_msg_id(target: str, event_id: str) -> str:
    return f"replay-{target}-{event_id}"


# Replay -----------------------------------------------------------------------------


@dataclass
class ReplayItem:
    """One event that is (or would be) replayed."""

    seq: int
    id: str
    source: str
    type: str
    stored_at: datetime


@dataclass
class ReplayProgress:
    """Where a replay stands, for a progress display."""

    scanned: int = 0
    total: int = 0  # messages in the range (an upper bound with --until or --types)
    matched: int = 0
    published: int = 0


@dataclass
class ReplayResult:
    target: str
    since: datetime | None
    until: datetime | None
    types: str | None
    filters: list[str]
    dry_run: bool
    scanned: int = 0
    matched: int = 0
    published: int = 0
    duplicates: int = 0  # already replayed within the duplicate window: stored once
    skipped: int = 0  # routed by a widened filter only, or looping back to the target
    sample: list[ReplayItem] = field(default_factory=list)
    from_seq: int | None = None
    to_seq: int | None = None

    def window(self) -> str:
        if self.since is None:
            return f"from seq {self.from_seq or 1}" + (
                f" to seq {self.to_seq}" if self.to_seq is not None else ""
            )
        return f"since {self.since.isoformat()}" + (
            f" until {self.until.isoformat()}" if self.until else ""
        )


def narrow(route_pattern: str | None, types: str | None) -> str | bool | None:
    """The type pattern covering ``route_pattern`` AND ``types``.

    Returns the narrower pattern when one contains the other, the route's own
    pattern when they merely overlap (the exact check happens per event), and
    ``False`` when no type can match both.
    """
    if types is None:
        return route_pattern
    if route_pattern is None or subsumes(route_pattern, types):
        return types
    if subsumes(types, route_pattern):
        return route_pattern
    if collide(route_pattern, types):
        return route_pattern
    return False


def source_filters(
    subjects: Subjects, routes: list[tuple[str, str | None]], types: str | None
) -> list[str]:
    """The evt subjects to read for a target's routes, narrowed by ``types``."""
    wanted: list[str] = []
    for src, pat in routes:
        n = narrow(pat, types)
        if n is False:
            continue
        wanted.append(subjects.evt_filter(src, n if isinstance(n, str) else None))
    return reduce_filters(wanted)


def _validate_seqs(since: datetime | None, from_seq: int | None, to_seq: int | None) -> None:
    if since is not None and (from_seq is not None or to_seq is not None):
        raise ValidationError("replay from a time or from a sequence, not both")
    if since is None and from_seq is None:
        raise ValidationError("give a time (--since) or a first sequence to replay from")
    if from_seq is not None and from_seq < 1:
        raise ValidationError(f"the first sequence must be at least 1, not {from_seq}")
    if to_seq is not None and from_seq is not None and to_seq < from_seq:
        raise ValidationError(f"the last sequence {to_seq} is before the first {from_seq}")


def _validate_window(since: datetime, until: datetime | None, now: datetime) -> None:
    if since.tzinfo is None or (until is not None and until.tzinfo is None):
        raise ValidationError("--since and --until need a time zone (naive times mean UTC)")
    if since > now:
        raise ValidationError(f"--since {since.isoformat()} is in the future")
    if until is not None and until <= since:
        raise ValidationError(
            f"--until {until.isoformat()} is not after --since {since.isoformat()}"
        )


async def replay(
    client: MeshClient,
    target: str,
    since: datetime | None,
    until: datetime | None = None,
    types: str | None = None,
    *,
    from_seq: int | None = None,
    to_seq: int | None = None,
    dry_run: bool = False,
    progress: Callable[[ReplayProgress], None] | None = None,
    batch: int = SCAN_BATCH,
    sample_size: int = SAMPLE_SIZE,
) -> ReplayResult:
    """Re-inject ``target``'s events stored in ``[since, until]`` (or with stream sequences
    in ``[from_seq, to_seq]``) on its replay subject.

    Raises ``NotFound`` for an unknown target and when nothing in the window is
    routed to it, ``ValidationError`` for a bad window or pattern.
    """
    now = datetime.now(UTC)
    _validate_seqs(since, from_seq, to_seq)
    if since is not None:
        _validate_window(since, until, now)
    elif until is not None:
        raise ValidationError("--until goes with --since, not with a sequence range")
    if types is not None:
        validate_pattern(types)
    await client.target_or_error(target)
    routes = await client.registry.routes_for(target)
    if not routes:
        raise NotFound(
            f"nothing to replay: no propagation routes events to target {target!r}"
            " (see `mesh propagation list`)"
        )
    filters = source_filters(client.subjects, routes, types)
    if not filters:
        raise NotFound(
            f"nothing to replay: no propagation to target {target!r} carries types {types!r}"
        )
    result = ReplayResult(
        target, since, until, types, filters, dry_run, from_seq=from_seq, to_seq=to_seq
    )
    state = ReplayProgress()

    def set_total(n: int) -> None:
        state.total = n
        if progress:
            progress(state)

    pipe = _Pipeline(client.js)
    max_hops = client.settings.max_hops

    def count(new: int, dup: int) -> None:
        result.published += new
        result.duplicates += dup
        state.published = result.published + result.duplicates

    try:
        async for msg in scan(
            client.js,
            client.names.events,
            filters,
            start_time=since,
            start_seq=from_seq,
            batch=batch,
            on_total=set_total,
        ):
            meta = msg.metadata
            if until is not None and meta.timestamp > until:
                break
            if to_seq is not None and meta.sequence.stream > to_seq:
                break
            result.scanned += 1
            state.scanned = result.scanned
            headers = dict(msg.headers or {})
            try:
                source, etype, _ = client.subjects.parse_event(msg.subject)
            except ValidationError:
                result.skipped += 1
                continue
            if types is not None and not subject_matches(types, etype):
                continue
            origin = headers.get(f"ce-{envelope.EXT_ORIGIN}") or source
            try:
                hops = int(headers.get(f"ce-{envelope.EXT_HOPS}", "0"))
            except ValueError:
                hops = 0
            if not route_accepts(routes, source, etype) or origin == target or hops > max_hops:
                result.skipped += 1
                continue
            event_id = event_id_of(headers, meta.sequence.stream)
            result.matched += 1
            state.matched = result.matched
            if len(result.sample) < sample_size:
                result.sample.append(
                    ReplayItem(meta.sequence.stream, event_id, source, etype, meta.timestamp)
                )
            if not dry_run:
                out = replay_headers(
                    headers,
                    msg.data,
                    source=source,
                    event_type=etype,
                    msg_id=replay_msg_id(target, event_id),
                    seq=meta.sequence.stream,
                )
                subject = client.subjects.replay(target, source, etype)
                count(*await pipe.publish(subject, msg.data, out))
            if progress and (result.scanned % 64 == 0):
                progress(state)
        count(*await pipe.finish())
    finally:
        pipe.abandon()  # an error or an interrupt: nothing outstanding is waited for
    if progress:
        progress(state)
    if result.matched == 0:
        raise NotFound(
            f"nothing to replay: no event for target {target!r} {result.window()}"
            + (f" matching {types!r}" if types else "")
        )
    return result


class _Pipeline:
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


__all__ = [
    "ReplayItem",
    "ReplayProgress",
    "ReplayResult",
    "event_id_of",
    "narrow",
    "replay",
    "replay_headers",
    "replay_msg_id",
    "scan",
    "source_filters",
]

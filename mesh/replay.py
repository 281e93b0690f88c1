"""Replay: re-inject a target's past events so that only that target receives them again.

Events are read from the target's *source* subjects (``<prefix>.evt.<source>.>``
as its propagations route them) starting at a time, with a short-lived
unacknowledged consumer, and republished on
``<prefix>.replay.<target>.<source>.<type>``. That subject is in the target's
``deliver-<target>`` filter and in no other consumer's, so the event goes
through normal delivery again (fresh attempts, same receivers' dedupe) for that
target only. It works for a target registered after the events were published.

A replayed message keeps the original headers and (still encrypted) body, hence
the original event id, and carries ``ce-meshreplay: true``. Its
``Nats-Msg-Id`` is ``replay-<target>-<id>``: different from the original's (or
the stream would drop it as a duplicate) and the same on every run, so that an
interrupted replay run again within the duplicate window is stored once; past
the window receivers still dedupe on the id.

Reading the range is ``JetStreamPort.scan`` (``mesh/_nats/scan.py``), shared with the
DLQ and key tools.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mesh import envelope, tracing
from mesh._nats.pipeline import PUBLISH_WINDOW
from mesh._nats.scan import SCAN_BATCH
from mesh.client import MeshClient
from mesh.delivery import MessageHeaders
from mesh.errors import NotFound, ValidationError
from mesh.registry import route_accepts
from mesh.subjects import (
    Subjects,
    collide,
    reduce_filters,
    subject_matches,
    subsumes,
    validate_pattern,
)

SAMPLE_SIZE = 20


# Replay headers ---------------------------------------------------------------------


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
    if envelope.H_ID not in out:
        out.update(
            {
                envelope.H_SPECVERSION: envelope.SPECVERSION,
                envelope.H_ID: MessageHeaders(original).event_id(seq),
                envelope.H_SOURCE: source,
                envelope.H_TYPE: event_type,
            }
        )
        if envelope.H_ENCRYPTION not in out:
            try:
                json.loads(body) if body else None
                out[envelope.H_DATACONTENTTYPE] = envelope.JSON
            except (ValueError, UnicodeDecodeError):
                out[envelope.H_DATACONTENTTYPE] = envelope.OCTETS
    out[envelope.H_REPLAY] = "true"
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
    # The target's reference: a tenant's is ~tenant.name, as its subjects (and its
    # events' origin, for the loop check) name it.
    target = (await client.target_or_error(target)).ref
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

    pipe = client.port.ack_window(PUBLISH_WINDOW)
    max_hops = client.settings.max_hops

    def count() -> None:
        result.published = sum(pipe.new.values())
        result.duplicates = pipe.duplicates
        state.published = pipe.counted

    try:
        async for msg in client.port.scan(
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
            view = MessageHeaders(headers)
            try:
                source, etype, _ = client.subjects.parse_event(msg.subject)
            except ValidationError:
                result.skipped += 1
                continue
            if types is not None and not subject_matches(types, etype):
                continue
            origin, hops = view.origin or source, view.hops
            if not route_accepts(routes, source, etype) or origin == target or hops > max_hops:
                result.skipped += 1
                continue
            event_id = view.event_id(meta.sequence.stream)
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
                if tracing.TRACER is not None:
                    tracing.replay_span(out, target, subject, event_id)
                await pipe.publish(subject, msg.data, out)
                count()
            if progress and (result.scanned % 64 == 0):
                progress(state)
        await pipe.finish()
        count()
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


__all__ = [
    "ReplayItem",
    "ReplayProgress",
    "ReplayResult",
    "narrow",
    "replay",
    "replay_headers",
    "replay_msg_id",
    "source_filters",
]

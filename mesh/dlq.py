"""The dead-letter stream: list, show, replay and purge.

A dead letter is the original event message (headers and still-encrypted body)
on ``<prefix>.dlq.<target>`` with ``mesh-dlq-*`` headers saying why it died
(``mesh.records``). Replaying one republishes it on the target's replay subject,
so it goes through normal delivery again with fresh attempts, and deletes it
from the DLQ only once the stream has acknowledged the republished copy: a
crash in between leaves the dead letter in place, and replaying it again is
stored once (the copy's ``Nats-Msg-Id`` is derived from the dead letter's id).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mesh import envelope
from mesh._nats.types import js_errors, nats_errors
from mesh.client import MeshClient
from mesh.errors import BrokerError, DecodeError, NotFound, ValidationError
from mesh.records import DeadLetter, parse_dead_letter
from mesh.registry import Target, TargetStatus
from mesh.replay import replay_headers
from mesh.subjects import DEFAULT_TENANT, TENANT_MARK, split_source, validate_target_ref

REPLAY_BATCH = 64
MAX_SEQ = 2**63 - 1  # a larger number is no stream sequence: it is looked up as an id
PUBLISH_TIMEOUT_S = 10.0


@dataclass
class DlqEntry:
    """One dead letter as stored in the DLQ stream."""

    seq: int
    letter: DeadLetter
    source: str | None
    type: str | None

    @property
    def event_id(self) -> str:
        return self.letter.event_id

    @property
    def target(self) -> str:
        """The target's reference (a tenant's: ``~tenant.name``)."""
        return self.letter.target

    @property
    def tenant(self) -> str:
        """The target's tenant: its reference's, else (a target named mesh-wide) the
        original event's."""
        if self.target.startswith(TENANT_MARK):
            return split_source(self.target)[0]
        return split_source(self.source)[0] if self.source else DEFAULT_TENANT

    def doc(self) -> dict[str, Any]:
        d = self.letter
        return {
            "seq": self.seq,
            "dlq_id": d.id,
            "event_id": d.event_id,
            "target": split_source(d.target)[1],  # its name; ``tenant`` says whose
            "tenant": self.tenant,
            "source": self.source,
            "type": self.type,
            "attempts": d.attempts,
            "error": d.error,
            "at": d.at.isoformat(),
            "original_subject": d.original_subject,
            "encrypted": "mesh-encryption" in d.headers,
            "size": len(d.body),
        }


@dataclass
class DlqListing:
    entries: list[DlqEntry] = field(default_factory=list)
    unreadable: int = 0  # messages on the DLQ subjects that are not dead letters


def _filter(client: MeshClient, target: str | None) -> str:
    if target is None:
        return client.subjects.dlq_all
    return client.subjects.dlq(validate_target_ref(target))


def _entry(client: MeshClient, seq: int, headers: dict[str, str] | None, body: bytes) -> DlqEntry:
    letter = parse_dead_letter(headers, body)
    source: str | None
    etype: str | None
    try:
        source, etype, _ = client.subjects.parse_event(letter.original_subject)
    except ValidationError:
        source, etype = letter.headers.get(envelope.H_SOURCE), letter.headers.get(envelope.H_TYPE)
    return DlqEntry(seq=seq, letter=letter, source=source, type=etype)


async def iter_dead_letters(
    client: MeshClient,
    target: str | None = None,
    since: datetime | None = None,
    *,
    listing: DlqListing | None = None,
    on_total: Callable[[int], None] | None = None,
    start_seq: int | None = None,
) -> AsyncIterator[DlqEntry]:
    """Dead letters oldest first, read as they come (memory stays bounded).

    From ``since`` or, without it, from the DLQ sequence ``start_seq`` (a page's
    cursor). Messages on the DLQ subjects that are not dead letters are counted in
    ``listing.unreadable``; ``on_total`` hears how many messages the range holds.
    """
    async for msg in client.port.scan(
        client.names.dlq,
        [_filter(client, target)],
        start_time=since,
        start_seq=start_seq,
        on_total=on_total,
    ):
        try:
            yield _entry(client, msg.metadata.sequence.stream, msg.headers, msg.data)
        except DecodeError:
            if listing is not None:
                listing.unreadable += 1


async def check_target(client: MeshClient, target: str | None) -> str | None:
    """The reference of ``target`` as the client's tenant names it (its dead letters' subject
    names that); an unknown target is ``NotFound`` unless dead letters for it remain."""
    if target is None:
        return None
    try:
        return (await client.target_or_error(target)).ref
    except NotFound:
        subject = _filter(client, target)
        info = await client.port.stream_info(client.names.dlq, subjects_filter=subject)
        if not info.state.subjects:
            raise
        return target


async def list_dead_letters(
    client: MeshClient,
    target: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
    *,
    start_seq: int | None = None,
) -> DlqListing:
    """Dead letters oldest first, for one target or all, stored at or after ``since``
    (or from the DLQ sequence ``start_seq``)."""
    listing = DlqListing()
    async for entry in iter_dead_letters(
        client, target, since, listing=listing, start_seq=start_seq
    ):
        listing.entries.append(entry)
        if limit is not None and len(listing.entries) >= limit:
            break
    return listing


MIN_PREFIX = 8  # the shortest id prefix `find` accepts (tables cut ids to at least this)


async def find(client: MeshClient, ident: str) -> list[DlqEntry]:
    """Dead letters whose DLQ id, event id or stream sequence is ``ident``, or whose
    event id or DLQ id starts with it (at least ``MIN_PREFIX`` characters, one event)."""
    ident = ident.strip()
    if not ident:
        raise ValidationError("give a dead letter id, event id or DLQ sequence")
    if ident.isdigit() and int(ident) <= MAX_SEQ:
        seq = int(ident)
        try:
            raw = await client.port.get_msg(client.names.dlq, seq)
        except (js_errors.NotFoundError, js_errors.BadRequestError):
            raw = None
        if raw is not None and raw.seq:
            try:
                return [_entry(client, raw.seq, raw.headers, raw.data or b"")]
            except DecodeError:
                raise NotFound(f"DLQ message {seq} is not a dead letter") from None
    found: list[DlqEntry] = []
    starting: list[DlqEntry] = []  # a prefix as narrow tables show it
    prefix = len(ident) >= MIN_PREFIX
    async for e in iter_dead_letters(client):
        if ident in (e.letter.id, e.event_id):
            found.append(e)
        elif prefix and (e.event_id.startswith(ident) or e.letter.id.startswith(ident)):
            starting.append(e)
    if not found and starting:
        if len({e.event_id for e in starting}) > 1:
            raise ValidationError(f"{ident!r} is the start of several ids: give more of it")
        found = starting
    if not found:
        raise NotFound(f"no dead letter {ident!r} (see `mesh dlq list`)")
    return found


# Replay -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kept:
    """A dead letter left in the DLQ, and why."""

    event_id: str
    seq: int
    target: str
    reason: str


@dataclass
class DlqReplayResult:
    replayed: int = 0  # republished and deleted from the DLQ
    duplicates: int = 0  # of those, copies the events stream had already stored
    failed: list[Kept] = field(default_factory=list)  # could not be republished or deleted
    skipped: list[Kept] = field(default_factory=list)  # no target to send them to
    disabled_targets: set[str] = field(default_factory=set)


def dlq_replay_msg_id(entry: DlqEntry) -> str:
    return f"dlq-replay-{entry.letter.id}"


def _kept(e: DlqEntry, reason: str) -> Kept:
    return Kept(e.event_id, e.seq, e.target, reason)


async def replay_dead_letters(
    client: MeshClient,
    entries: AsyncIterable[DlqEntry] | Iterable[DlqEntry],
    *,
    progress: Callable[[int], None] | None = None,
    batch: int = REPLAY_BATCH,
) -> DlqReplayResult:
    """Send dead letters back through their targets' normal delivery, then drop them.

    Works through ``entries`` a batch at a time; ``progress`` hears how many
    were handled so far.
    """
    result = DlqReplayResult()
    targets: dict[str, Target | None] = {}
    done = 0
    chunk: list[DlqEntry] = []

    async def admit(e: DlqEntry) -> bool:
        if e.target not in targets:
            try:
                targets[e.target] = await client.registry.get_target(e.target)
            except (NotFound, ValidationError):
                targets[e.target] = None
        t = targets[e.target]
        if t is None:
            result.skipped.append(_kept(e, f"target {e.target!r} no longer exists"))
            return False
        if e.source is None or e.type is None:
            result.skipped.append(_kept(e, "the original subject names no source and type"))
            return False
        if t.status == TargetStatus.DISABLED:
            result.disabled_targets.add(t.name)
        return True

    async def flush() -> None:
        nonlocal done
        await _replay_chunk(client, chunk, result)
        done += len(chunk)
        chunk.clear()
        if progress:
            progress(done)

    async for e in _aiter(entries):
        if await admit(e):
            chunk.append(e)
        else:
            done += 1
        if len(chunk) >= batch:
            await flush()
    await flush()
    return result


async def _aiter(items: AsyncIterable[DlqEntry] | Iterable[DlqEntry]) -> AsyncIterator[DlqEntry]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def _replay_chunk(client: MeshClient, chunk: list[DlqEntry], result: DlqReplayResult) -> None:
    outcomes = await asyncio.gather(*(_publish(client, e) for e in chunk), return_exceptions=True)
    acked: list[DlqEntry] = []
    for e, out in zip(chunk, outcomes, strict=True):
        if isinstance(out, BaseException):
            result.failed.append(_kept(e, _why(out)))
        else:
            acked.append(e)
            if out:
                result.duplicates += 1
    # Only now, with the copies stored, do the dead letters go.
    deletions = await asyncio.gather(
        *(_delete(client, e.seq) for e in acked), return_exceptions=True
    )
    for e, out in zip(acked, deletions, strict=True):
        if isinstance(out, BaseException):
            result.failed.append(_kept(e, f"replayed but not deleted from the DLQ: {_why(out)}"))
        else:
            result.replayed += 1


async def _publish(client: MeshClient, entry: DlqEntry) -> bool:
    """Publish the replay copy; returns True when the stream already had it."""
    assert entry.source is not None and entry.type is not None
    headers = replay_headers(
        entry.letter.headers,
        entry.letter.body,
        source=entry.source,
        event_type=entry.type,
        msg_id=dlq_replay_msg_id(entry),
    )
    subject = client.subjects.replay(entry.target, entry.source, entry.type)
    ack = await client.port.publish(
        subject, entry.letter.body, headers=headers, timeout=PUBLISH_TIMEOUT_S
    )
    return bool(ack.duplicate)


async def _delete(client: MeshClient, seq: int) -> bool:
    """Delete one DLQ message; False when it was gone already (a concurrent replay or purge)."""
    try:
        await client.port.delete_msg(client.names.dlq, seq)
    except js_errors.NotFoundError:
        return False
    except js_errors.APIError as exc:
        if exc.err_code != 10057:  # "no message found"
            raise
        return False
    return True


def _why(exc: BaseException) -> str:
    if isinstance(exc, nats_errors.TimeoutError | TimeoutError):
        return "publish timed out"
    if isinstance(exc, js_errors.NoStreamResponseError):
        return "no stream stores replayed events: run `mesh init`"
    if isinstance(exc, js_errors.APIError):
        return str(exc.description or exc)
    return str(exc) or type(exc).__name__


# Purge ------------------------------------------------------------------------------


@dataclass
class PurgePlan:
    """What a purge would remove: counted before asking, removed exactly."""

    target: str | None
    subject: str
    count: int
    last_seq: int  # purge by filter up to here
    seqs: list[int] | None = None  # with --since: exactly these


async def plan_purge(
    client: MeshClient, target: str | None = None, since: datetime | None = None
) -> PurgePlan:
    subject = _filter(client, target)
    if since is not None:
        listing = await list_dead_letters(client, target, since)
        seqs = [e.seq for e in listing.entries]
        return PurgePlan(target, subject, len(seqs), max(seqs, default=0), seqs)
    try:
        info = await client.port.stream_info(client.names.dlq, subjects_filter=subject)
    except js_errors.NotFoundError:
        raise BrokerError(f"stream {client.names.dlq} does not exist: run `mesh init`") from None
    count = sum((info.state.subjects or {}).values())
    return PurgePlan(target, subject, count, info.state.last_seq)


async def purge(client: MeshClient, plan: PurgePlan) -> int:
    """Remove what the plan counted; returns how many messages went."""
    if plan.count == 0:
        return 0
    if plan.seqs is not None:
        removed = 0
        for seq in plan.seqs:
            removed += await _delete(client, seq)
        return removed
    # Purge by filter, below the last sequence counted: dead letters that arrive
    # while the operator confirms are kept.
    req = {"filter": plan.subject, "seq": plan.last_seq + 1}
    try:
        resp = await client.port.api_request(
            f"STREAM.PURGE.{client.names.dlq}",
            json.dumps(req).encode(),
            timeout=10,
        )
    except js_errors.APIError as exc:
        raise BrokerError(f"purge refused: {exc.description or exc}") from None
    return int(resp.get("purged", 0))


__all__ = [
    "DlqEntry",
    "DlqListing",
    "DlqReplayResult",
    "Kept",
    "PurgePlan",
    "check_target",
    "dlq_replay_msg_id",
    "find",
    "iter_dead_letters",
    "list_dead_letters",
    "plan_purge",
    "purge",
    "replay_dead_letters",
]

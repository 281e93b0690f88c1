"""History and recovery: events and delivery attempts from the sink's tables, dead letters,
replays.

- ``GET /v1/events``, ``GET /v1/deliveries``: filtered, newest first, cursor-paged
  (``Store.list_events``/``list_deliveries``: keyset on ``(time, id)``; pass a page's
  ``next_cursor`` as ``cursor``).
- ``GET /v1/events/{id}``: one event with every attempt (what ``mesh deliveries``
  shows; the same documents, ``mesh.history``).
- ``/v1/dead-letters``: list, show, retry one or a filtered set, purge; the DLQ
  stream through ``mesh.dlq``, exactly as ``mesh dlq`` does.
- ``POST /v1/targets/{name}/replay``: ``mesh.replay.replay`` from a time or a stream
  sequence range, as ``mesh replay`` does.

Reads need the ``read`` scope; retries, purges and replays ``admin``, and are audited.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from mesh import dlq
from mesh.apikeys import Scope
from mesh.errors import NotFound, ValidationError
from mesh.history import delivery_doc, event_doc
from mesh.replay import replay
from mesh.storage import EventRow
from services.api import history_tenancy as scoped
from services.api.history_models import (
    MAX_SEQ,
    DeadLetterList,
    DeadLetterOut,
    DeadLettersQuery,
    DeliveriesQuery,
    DeliveryOut,
    DeliveryPage,
    EventDetail,
    EventOut,
    EventPage,
    EventsQuery,
    KeptOut,
    Purged,
    PurgeQuery,
    ReplayBySeq,
    ReplayByTime,
    ReplayIn,
    ReplayOut,
    RetryIn,
    RetryOut,
)
from services.api.routing import NAME_PATTERN, Call, Param, Route, RouteTable

EVENT_ID = r"^\S{1,128}$"
NAME_PARAM = Param("name", "path", "The target's name", pattern=NAME_PATTERN)
EVENT_PARAM = Param("id", "path", "The event id", pattern=EVENT_ID)
LETTER_PARAM = Param(
    "ident", "path", "A dead letter id, an event id or a DLQ sequence", pattern=EVENT_ID
)
# Handlers ---------------------------------------------------------------------------


def _event(call: Call, row: EventRow) -> EventOut:
    return EventOut.model_validate(event_doc(row, call.api.reader.data(row)))


async def list_events(call: Call) -> EventPage:
    q: EventsQuery = call.query
    store = await scoped.history(call)
    page = await store.list_events(
        source=q.source, type=q.type, since=q.since, until=q.until, cursor=q.cursor, limit=q.limit
    )
    items = [_event(call, r) for r in page.items]
    return EventPage(items=items, next_cursor=page.next_cursor)


async def get_event(call: Call) -> EventDetail:
    event_id = call.params["id"]
    store = await scoped.history(call)  # a tenant key: its tenant's rows only, in the SQL
    row = await store.get_event(event_id)
    attempts = await store.query_deliveries(event_id)
    if row is None and not attempts:
        raise NotFound(f"no event {event_id!r} in the database")
    return EventDetail(
        event=None if row is None else _event(call, row),
        deliveries=[DeliveryOut.model_validate(delivery_doc(d)) for d in attempts],
    )


async def list_deliveries(call: Call) -> DeliveryPage:
    q: DeliveriesQuery = call.query
    store, target = await scoped.deliveries_of(call, q.target)
    page = await store.list_deliveries(
        target=target,
        outcomes=q.outcome,
        event_id=q.event_id,
        since=q.since,
        until=q.until,
        cursor=q.cursor,
        limit=q.limit,
    )
    items = [DeliveryOut.model_validate(delivery_doc(d)) for d in page.items]
    return DeliveryPage(items=items, next_cursor=page.next_cursor)


def dlq_cursor(seq: int) -> str:
    """The cursor of the page after the dead letter with DLQ sequence ``seq``."""
    raw = json.dumps(["dead-letters", seq]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after_seq(cursor: str) -> int:
    try:
        kind, seq = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if kind != "dead-letters" or type(seq) is not int or not 0 < seq < MAX_SEQ:
            raise ValueError(kind)
    except (ValueError, TypeError, binascii.Error):
        what = f"invalid cursor for the dead letters list: {cursor[:80]!r}"
        raise ValidationError(what) from None
    return seq


async def list_dead_letters(call: Call) -> DeadLetterList:
    q: DeadLettersQuery = call.query
    if q.cursor is not None and q.since is not None:
        raise ValidationError("give since or cursor, not both (a cursor carries on a listing)")
    start_seq = _after_seq(q.cursor) + 1 if q.cursor is not None else None
    target = await scoped.own_target(call, q.target, "dead letters")
    client = call.api.client
    target = await dlq.check_target(client, target)
    # One more than the page: whether there is a next page, without a second scan.
    listing = await dlq.list_dead_letters(client, target, q.since, q.limit + 1, start_seq=start_seq)
    entries = listing.entries[: q.limit]
    more = len(listing.entries) > q.limit
    return DeadLetterList(
        items=[DeadLetterOut.model_validate(e.doc()) for e in entries],
        unreadable=listing.unreadable,
        next_cursor=dlq_cursor(entries[-1].seq) if more else None,
    )


async def get_dead_letter(call: Call) -> list[DeadLetterOut]:
    ident = call.params["ident"]
    found = await dlq.find(call.api.client, ident)
    mine = await scoped.visible_targets(call)
    if mine is not None:
        found = scoped.only_visible(found, mine)
        if not found:
            raise NotFound(f"no dead letter {ident!r} (see `mesh dlq list`)")
    return [DeadLetterOut.model_validate(e.doc()) for e in found]


async def _retry(call: Call, entries: Any, what: dict[str, Any]) -> RetryOut:
    result = await dlq.replay_dead_letters(call.api.client, entries)
    out = RetryOut(
        replayed=result.replayed,
        duplicates=result.duplicates,
        failed=[KeptOut.model_validate(asdict(k)) for k in result.failed],
        skipped=[KeptOut.model_validate(asdict(k)) for k in result.skipped],
        disabled_targets=sorted(result.disabled_targets),
    )
    await call.api.audit.record(call.actor, "dlq.retry", "dlq", what, out.model_dump(mode="json"))
    return out


async def retry_dead_letter(call: Call) -> RetryOut:
    ident = call.params["ident"]
    found = await dlq.find(call.api.client, ident)
    mine = await scoped.visible_targets(call)
    if mine is not None:
        found = scoped.only_visible(found, mine)
        if not found:
            raise NotFound(f"no dead letter {ident!r} (see `mesh dlq list`)")
    return await _retry(call, found, {"ident": ident})


async def retry_dead_letters(call: Call) -> RetryOut:
    body: RetryIn = call.body
    client = call.api.client
    target = await scoped.own_target(call, body.target, "dead letters", required=False)
    target = await dlq.check_target(client, target)
    wanted = set(body.ids)

    async def entries() -> AsyncIterator[dlq.DlqEntry]:
        # Streamed, as `mesh dlq replay` does: a long DLQ is never held in memory.
        async for e in dlq.iter_dead_letters(client, target, body.since):
            if not wanted or e.event_id in wanted or e.letter.id in wanted:
                yield e

    return await _retry(call, entries(), body.model_dump(mode="json"))


async def purge_dead_letters(call: Call) -> Purged:
    q: PurgeQuery = call.query
    target = None if q.target == "*" else q.target
    client = call.api.client
    target = await scoped.own_target(call, target, "dead letters", required=False)
    target = await dlq.check_target(client, target)
    plan = await dlq.plan_purge(client, target, q.since)
    purged = await dlq.purge(client, plan)
    if purged:
        await call.api.audit.record(
            call.actor, "dlq.purge", "dlq", q.model_dump(mode="json"), {"purged": purged}
        )
    return Purged(purged=purged)


def _empty_window(body: ReplayByTime | ReplayBySeq) -> str | None:
    """Why a well-formed window holds nothing (the answer is then 404, like no events)."""
    if isinstance(body, ReplayBySeq):
        if body.to_seq is not None and body.to_seq < body.from_seq:
            return f"sequence {body.to_seq} is before {body.from_seq}"
        return None
    if body.since > datetime.now(UTC):
        return f"since {body.since.isoformat()} is in the future"
    if body.until is not None and body.until <= body.since:
        return f"until {body.until.isoformat()} is not after since"
    return None


async def replay_target(call: Call) -> ReplayOut:
    body: ReplayByTime | ReplayBySeq = call.body
    name = call.params["name"]
    name = await scoped.own_target(call, name, "replays") or name
    empty = _empty_window(body)
    if empty is not None:
        await call.api.client.target_or_error(name)
        raise NotFound(f"nothing to replay: {empty}")
    if isinstance(body, ReplayByTime):
        since, until, from_seq, to_seq = body.since, body.until, None, None
    else:
        since, until, from_seq, to_seq = None, None, body.from_seq, body.to_seq
    result = await replay(
        call.api.client,
        name,
        since,
        until,
        body.types,
        from_seq=from_seq,
        to_seq=to_seq,
        dry_run=body.dry_run,
    )
    out = ReplayOut.model_validate(asdict(result))
    if not body.dry_run:
        doc = out.model_dump(mode="json", exclude={"sample"})
        await call.api.audit.record(call.actor, "target.replay", f"target:{name}", None, doc)
    return out


# Routes -----------------------------------------------------------------------------


def register(table: RouteTable) -> None:
    h, d = ("history",), ("dead letters",)
    table.extend(
        [
            Route(
                "GET",
                "/v1/events",
                list_events,
                "List stored events",
                h,
                Scope.READ,
                "listEvents",
                query=EventsQuery,
                response=EventPage,
                description="Newest first, filtered; page with next_cursor.",
                tenant_aware=True,  # a tenant key reads through its TenantView
            ),
            Route(
                "GET",
                "/v1/events/{id}",
                get_event,
                "One event with every delivery attempt",
                h,
                Scope.READ,
                "getEvent",
                response=EventDetail,
                problems=(404,),
                params=(EVENT_PARAM,),
                tenant_aware=True,  # services/api/history_tenancy.py
            ),
            Route(
                "GET",
                "/v1/deliveries",
                list_deliveries,
                "List delivery attempts",
                h,
                Scope.READ,
                "listDeliveries",
                query=DeliveriesQuery,
                response=DeliveryPage,
                description="Newest first, filtered; page with next_cursor.",
                tenant_aware=True,  # services/api/history_tenancy.py
            ),
            Route(
                "GET",
                "/v1/dead-letters",
                list_dead_letters,
                "List dead letters",
                d,
                Scope.READ,
                "listDeadLetters",
                query=DeadLettersQuery,
                response=DeadLetterList,
                problems=(404,),
                description="Oldest first, filtered; page with next_cursor.",
                tenant_aware=True,  # services/api/history_tenancy.py
            ),
            Route(
                "GET",
                "/v1/dead-letters/{ident}",
                get_dead_letter,
                "Dead letters with this id, event id or DLQ sequence",
                d,
                Scope.READ,
                "getDeadLetter",
                response=list[DeadLetterOut],
                problems=(404,),
                params=(LETTER_PARAM,),
                tenant_aware=True,  # services/api/history_tenancy.py
            ),
            Route(
                "POST",
                "/v1/dead-letters/{ident}/retry",
                retry_dead_letter,
                "Retry one dead letter",
                d,
                Scope.ADMIN,
                "retryDeadLetter",
                response=RetryOut,
                problems=(404,),
                params=(LETTER_PARAM,),
                description="Sends it back through normal delivery; it leaves the DLQ.",
                tenant_aware=True,  # services/api/history_tenancy.py
            ),
            Route(
                "POST",
                "/v1/dead-letters:retry",
                retry_dead_letters,
                "Retry a filtered set of dead letters",
                d,
                Scope.ADMIN,
                "retryDeadLetters",
                body=RetryIn,
                response=RetryOut,
                problems=(404,),
            ),
            Route(
                "DELETE",
                "/v1/dead-letters",
                purge_dead_letters,
                "Purge dead letters",
                d,
                Scope.ADMIN,
                "purgeDeadLetters",
                query=PurgeQuery,
                response=Purged,
                problems=(404,),
                description="Deletes them for good: one target's (target=NAME) or all (target=*).",
            ),
            Route(
                "POST",
                "/v1/targets/{name}/replay",
                replay_target,
                "Replay a target's past events",
                ("targets",),
                Scope.ADMIN,
                "replayTarget",
                body=ReplayIn,
                response=ReplayOut,
                problems=(404,),
                params=(NAME_PARAM,),
                description="From a time window or a stream sequence range; original ids.",
                tenant_aware=True,  # services/api/history_tenancy.py
            ),
        ]
    )

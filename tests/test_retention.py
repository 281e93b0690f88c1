"""Retention on both backends: ``Store.prune``, the sink's periodic prune, ``mesh events prune``.

Rows carry explicit times around a fixed cutoff instead of waiting for them to age.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mesh.errors import ValidationError
from mesh.storage import (
    DeadLetterRow,
    DeliveryRow,
    EventRow,
    HealthCheckRow,
    PruneResult,
    Store,
    Table,
    open_store,
)

CUT = datetime(2024, 6, 1, tzinfo=UTC)
OLD = CUT - timedelta(days=10)
NEW = CUT + timedelta(days=1)


def event(id: str, received: datetime, **kw: Any) -> EventRow:
    values: dict[str, Any] = dict(
        id=id,
        stream_seq=None,
        subject="mesh.evt.shop.order.created",
        source="shop",
        type="order.created",
        # The publisher's clock says nothing about age: received_at does.
        time=datetime(2000, 1, 1, tzinfo=UTC),
        payload=b"gAAAAA-token",
        encrypted=True,
        received_at=received,
    )
    values.update(kw)
    return EventRow(**values)


def attempt(id: str, event_id: str, at: datetime) -> DeliveryRow:
    return DeliveryRow(id=id, event_id=event_id, target="crm", attempt=1, outcome="failed", at=at)


def health(n: int, at: datetime) -> HealthCheckRow:
    return HealthCheckRow(service="sink", instance=f"i{n}", at=at, status="ok", stats={})


def dead(id: str, at: datetime) -> DeadLetterRow:
    return DeadLetterRow(
        id=id,
        event_id=id,
        target="crm",
        attempts=6,
        last_error="HTTP 500",
        payload=b"gAAAAA-dead",
        encrypted=True,
        dead_at=at,
    )


async def ids(store: Store, table: str) -> set[str]:
    if table == "events":
        return {e.id for e in await store.query_events(limit=100_000)}
    if table == "dead_letters":
        return {d.id for d in await store.query_dead_letters(limit=100_000)}
    raise AssertionError(table)


async def delivery_ids(store: Store, *event_ids: str) -> set[str]:
    found: set[str] = set()
    for e in event_ids:
        found |= {d.id for d in await store.query_deliveries(e)}
    return found


async def seed(store: Store) -> None:
    """Old and new rows of every kind, and the edge cases of events with deliveries."""
    await store.write_batch(
        events=[
            event("old", OLD),
            event("old-bare", OLD),  # no attempts at all
            event("at-cut", CUT),  # exactly at the cutoff: not older, stays
            event("new", NEW),
            event("old-replayed", OLD),  # an attempt after the cutoff keeps it
            event("new-early", NEW),  # an attempt stored before the event arrived
        ],
        deliveries=[
            attempt("a-old-1", "old", OLD),
            attempt("a-old-2", "old", OLD + timedelta(hours=1)),
            attempt("a-new", "new", NEW),
            attempt("a-replayed-1", "old-replayed", OLD),
            attempt("a-replayed-2", "old-replayed", NEW),
            attempt("a-early", "new-early", OLD),
            attempt("a-orphan-old", "never-stored", OLD),
            attempt("a-orphan-new", "never-stored-2", NEW),
        ],
        health_checks=[health(1, OLD), health(2, CUT - timedelta(microseconds=1)), health(3, NEW)],
        dead_letters=[dead("d-old", OLD), dead("d-new", NEW)],
    )
    await store.append_audit("test", "service.create", "service:crm", None, {"name": "crm"})


# Store.prune --------------------------------------------------------------------------


async def test_prune_deletes_older_rows_and_their_deliveries_only(store: Store) -> None:
    await seed(store)
    result = await store.prune(events_before=CUT, health_checks_before=CUT, dead_letters_before=CUT)
    assert result == PruneResult(events=2, deliveries=3, dead_letters=1, health_checks=2)
    assert await ids(store, "events") == {"at-cut", "new", "old-replayed", "new-early"}
    # Gone: both attempts of "old" and the old orphan. Kept: everything of a kept event.
    assert await delivery_ids(store, "old", "never-stored", "never-stored-2") == {"a-orphan-new"}
    assert await delivery_ids(store, "old-replayed", "new-early", "new") == {
        "a-replayed-1",
        "a-replayed-2",
        "a-early",
        "a-new",
    }
    assert await store.count(Table.HEALTH_CHECKS) == 1
    assert await ids(store, "dead_letters") == {"d-new"}
    assert await store.count(Table.AUDIT_LOG) == 1  # never pruned

    # Nothing left to do: a second prune deletes nothing.
    again = await store.prune(events_before=CUT, health_checks_before=CUT, dead_letters_before=CUT)
    assert again.total == 0


async def test_a_table_without_a_cutoff_is_kept(store: Store) -> None:
    await seed(store)
    before = {t: await store.count(t) for t in Table}
    assert (await store.prune()).total == 0
    result = await store.prune(health_checks_before=CUT)
    assert result == PruneResult(health_checks=2)
    after = {t: await store.count(t) for t in Table}
    assert after == {**before, Table.HEALTH_CHECKS: 1}


async def test_dry_run_counts_what_prune_deletes_and_changes_nothing(store: Store) -> None:
    await seed(store)
    before = {t: await store.count(t) for t in Table}
    cutoffs = dict(events_before=CUT, health_checks_before=CUT, dead_letters_before=CUT)
    planned = await store.prune(**cutoffs, dry_run=True)
    assert {t: await store.count(t) for t in Table} == before
    assert planned == await store.prune(**cutoffs)


async def test_batches_are_bounded_and_the_walk_passes_kept_rows(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 50 old events, every fifth kept by a recent attempt, so kept rows straddle
    # batch boundaries; 25 old orphan attempts and 40 old heartbeats besides.
    events = [event(f"e{n:03d}", OLD + timedelta(seconds=n)) for n in range(50)]
    attempts = [attempt(f"a{n:03d}", f"e{n:03d}", OLD + timedelta(seconds=n)) for n in range(50)]
    attempts += [attempt(f"r{n:03d}", f"e{n:03d}", NEW) for n in range(0, 50, 5)]
    attempts += [attempt(f"o{n:03d}", f"gone{n}", OLD) for n in range(25)]
    beats = [health(n, OLD + timedelta(seconds=n)) for n in range(40)]
    await store.write_batch(events=events, deliveries=attempts, health_checks=beats)

    deleted_per_statement: list[int] = []
    fetch_on = store._fetch_on  # type: ignore[attr-defined]

    async def counting(conn: Any, sql: str, *args: Any) -> Any:
        rows = await fetch_on(conn, sql, *args)
        if sql.startswith("DELETE"):
            deleted_per_statement.append(len(rows))
        return rows

    monkeypatch.setattr(store, "_fetch_on", counting)
    result = await store.prune(events_before=CUT, health_checks_before=CUT, batch_size=7)

    assert result == PruneResult(events=40, deliveries=40 + 25, health_checks=40)
    assert await ids(store, "events") == {f"e{n:03d}" for n in range(0, 50, 5)}
    assert await store.count(Table.DELIVERIES) == 20  # the kept events' old and new attempts
    assert await store.count(Table.HEALTH_CHECKS) == 0
    # Candidates are read 7 at a time: no statement deletes more than a batch's rows
    # (an event batch deletes up to 7 events and their attempts, one each here).
    assert max(deleted_per_statement) <= 7
    assert len(deleted_per_statement) >= (40 + 40 + 25 + 40) // 7


async def test_concurrent_prunes_delete_each_row_once(db_url: str, store: Store) -> None:
    events = [event(f"e{n:03d}", OLD + timedelta(seconds=n)) for n in range(60)]
    attempts = [attempt(f"a{n:03d}", f"e{n:03d}", OLD) for n in range(60)]
    await store.write_batch(events=events, deliveries=attempts)
    others = [await open_store(db_url) for _ in range(2)]
    try:
        results = await asyncio.gather(
            store.prune(events_before=CUT, batch_size=5),
            *(s.prune(events_before=CUT, batch_size=5) for s in others),
        )
    finally:
        for s in others:
            await s.close()
    assert sum(r.events for r in results) == 60
    assert sum(r.deliveries for r in results) == 60
    assert await store.count(Table.EVENTS) == 0
    assert await store.count(Table.DELIVERIES) == 0


async def test_prune_refuses_naive_cutoffs_and_empty_batches(store: Store) -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        await store.prune(events_before=datetime(2024, 1, 1))
    with pytest.raises(ValidationError, match="at least 1"):
        await store.prune(events_before=CUT, batch_size=0)

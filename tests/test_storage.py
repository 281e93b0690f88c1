"""The Store on both backends: migrations, idempotent batches, queries, audit, faults."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import StorageError, ValidationError
from mesh.storage import (
    DeadLetterRow,
    DeliveryRow,
    EventRow,
    HealthCheckRow,
    PropagationRow,
    RowsRefused,
    ServiceRow,
    Store,
    Table,
    WriteResult,
    open_store,
)
from tests.support import pg_target, remove_files, scratch_db, via
from tests.support.proxy import TCPProxy

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def event(n: int, **kw: Any) -> EventRow:
    values: dict[str, Any] = dict(
        id=f"evt-{n:05d}",
        stream_seq=n,
        subject=f"mesh.evt.shop.order.created.{n % 2}",
        source="shop" if n % 3 else "billing",
        type="order.created" if n % 2 else "order.paid",
        time=T0 + timedelta(seconds=n),
        payload=b"gAAAAA-token-" + str(n).encode(),
        encrypted=True,
        datacontenttype="application/msgpack",
        origin="shop",
        hops=1,
        received_at=T0 + timedelta(seconds=n, milliseconds=5),
    )
    values.update(kw)
    return EventRow(**values)


def delivery(n: int, event_id: str = "evt-00001", **kw: Any) -> DeliveryRow:
    values: dict[str, Any] = dict(
        id=f"att-{n:05d}",
        event_id=event_id,
        target="crm",
        attempt=n,
        outcome="failed" if n < 3 else "delivered",
        status_code=503 if n < 3 else 200,
        latency_ms=12.5,
        error="HTTP 503" if n < 3 else None,
        at=T0 + timedelta(seconds=10 + n),
        instance="egress-1",
    )
    values.update(kw)
    return DeliveryRow(**values)


def dead_letter(n: int, target: str = "crm") -> DeadLetterRow:
    return DeadLetterRow(
        id=f"dlq-{n:05d}",
        event_id=f"evt-{n:05d}",
        target=target,
        attempts=6,
        last_error="HTTP 500",
        payload=b"gAAAAA-dead-" + str(n).encode(),
        encrypted=True,
        dead_at=T0 + timedelta(minutes=n),
        stream_seq=n,
    )


def health(n: int) -> HealthCheckRow:
    return HealthCheckRow(
        service="sink",
        instance="sink-1",
        at=T0 + timedelta(seconds=5 * n),
        status="ok",
        stats={"written": n, "lag": {"events": 0}},
    )


# Migrations -----------------------------------------------------------------


async def test_migrate_from_empty_then_rerun_is_clean(db_url: str) -> None:
    async with await open_store(db_url) as s:
        assert await s.applied_migrations() == []
        assert await s.migrate() == [1, 2, 3, 4]
        assert await s.migrate() == []
        assert await s.applied_migrations() == [1, 2, 3, 4]
        for table in Table:
            expected = 4 if table is Table.SCHEMA_MIGRATIONS else 0
            assert await s.count(table) == expected


async def test_concurrent_migrations_apply_once(db_url: str) -> None:
    stores = [await open_store(db_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(s.migrate() for s in stores))
        # Each version once, by whichever store got to it first.
        assert sorted(v for applied in results for v in applied) == [1, 2, 3, 4]
        assert await stores[0].count(Table.SCHEMA_MIGRATIONS) == 4
    finally:
        for s in stores:
            await s.close()


# Batches ----------------------------------------------------------------------


async def test_write_batch_is_idempotent(store: Store) -> None:
    events = [event(n) for n in range(1, 21)]
    deliveries = [delivery(n) for n in range(1, 4)]
    dead = [dead_letter(n) for n in range(1, 3)]
    checks = [health(n) for n in range(3)]

    first = await store.write_batch(events, deliveries, dead, checks)
    assert first == WriteResult(events=20, deliveries=3, dead_letters=2, health_checks=3)
    again = await store.write_batch(events, deliveries, dead, checks)
    assert again == WriteResult()
    assert again.total == 0

    # Overlap with new rows, and duplicates inside one batch.
    mixed = await store.write_batch([*events[:5], event(21), event(21), event(22)])
    assert mixed.events == 2
    assert await store.count(Table.EVENTS) == 22
    assert await store.count("deliveries") == 3
    assert await store.count(Table.DEAD_LETTERS) == 2
    assert await store.count(Table.HEALTH_CHECKS) == 3
    assert await store.write_batch() == WriteResult()


async def test_rows_round_trip_with_utc_times(store: Store) -> None:
    plus2 = timezone(timedelta(hours=2))
    original = event(7, time=datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=plus2), ce_subject="o-7")
    await store.write_batch([original])
    got = await store.get_event("evt-00007")
    assert got is not None
    assert got.time == original.time
    assert got.time.utcoffset() == timedelta(0)
    assert got.time.hour == 12
    assert got.received_at.tzinfo is not None
    assert got.payload == original.payload
    assert got.encrypted is True
    assert (got.stream_seq, got.ce_subject, got.origin, got.hops) == (7, "o-7", "shop", 1)
    assert await store.get_event("nope") is None


async def test_rows_the_database_cannot_take_are_refused_not_retried(store: Store) -> None:
    with pytest.raises(RowsRefused, match="refused"):
        await store.write_batch([event(1), event(2, subject=None)])
    assert await store.count(Table.EVENTS) == 0  # the whole batch rolled back
    if store.backend == "postgres":
        with pytest.raises(RowsRefused):
            await store.write_batch([event(3, source="nul\x00byte")])
    assert (await store.write_batch([event(1)])).events == 1


async def test_naive_times_are_refused(store: Store) -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        await store.write_batch([event(1, time=datetime(2024, 1, 1))])
    assert await store.count(Table.EVENTS) == 0


async def test_parallel_overlapping_batches_store_each_row_once(store: Store) -> None:
    rows = [event(n) for n in range(200)]
    batches = []
    rng = random.Random(4)
    for _ in range(8):
        batch = rng.sample(rows, 120)
        batches.append(batch)
    await asyncio.gather(*(store.write_batch(b) for b in batches))
    await store.write_batch(rows)
    assert await store.count(Table.EVENTS) == 200


async def test_two_stores_on_one_database_write_concurrently(db_url: str, store: Store) -> None:
    async with await open_store(db_url) as other:
        rows = [event(n) for n in range(300)]
        await asyncio.gather(
            *(store.write_batch(rows[i : i + 50]) for i in range(0, 300, 50)),
            *(other.write_batch(rows[i : i + 75]) for i in range(0, 300, 75)),
        )
    assert await store.count(Table.EVENTS) == 300


# Queries ----------------------------------------------------------------------


async def test_query_events_filters(store: Store) -> None:
    await store.write_batch([event(n) for n in range(1, 13)])
    await store.write_batch(
        [event(100, type="order.line.added"), event(101, type="user.created", source="auth")]
    )

    newest = await store.query_events(limit=3)
    assert [e.id for e in newest] == ["evt-00101", "evt-00100", "evt-00012"]

    billing = await store.query_events(source="billing")
    assert {e.id for e in billing} == {"evt-00003", "evt-00006", "evt-00009", "evt-00012"}

    created = await store.query_events(type="order.created")
    assert all(e.type == "order.created" for e in created) and len(created) == 6

    one_token = await store.query_events(type="order.*")
    assert {e.type for e in one_token} == {"order.created", "order.paid"}
    rest = await store.query_events(type="order.>")
    assert {e.type for e in rest} == {"order.created", "order.paid", "order.line.added"}

    since = await store.query_events(since=T0 + timedelta(seconds=11), source="shop")
    assert [e.id for e in since] == ["evt-00100", "evt-00011"]

    with pytest.raises(ValidationError):
        await store.query_events(type="order.>.x")
    with pytest.raises(ValidationError):
        await store.query_events(limit=0)


async def test_query_deliveries_and_dead_letters(store: Store) -> None:
    await store.write_batch(
        deliveries=[delivery(3), delivery(1), delivery(2), delivery(9, event_id="evt-other")],
        dead_letters=[dead_letter(1), dead_letter(2, target="erp"), dead_letter(3)],
    )
    attempts = await store.query_deliveries("evt-00001")
    assert [d.attempt for d in attempts] == [1, 2, 3]
    assert attempts[0].status_code == 503 and attempts[0].error == "HTTP 503"
    assert attempts[2].outcome == "delivered" and attempts[2].error is None
    assert await store.query_deliveries("missing") == []

    assert [d.id for d in await store.query_dead_letters(target="crm")] == [
        "dlq-00003",
        "dlq-00001",
    ]
    assert len(await store.query_dead_letters()) == 3
    assert len(await store.query_dead_letters(limit=1)) == 1


async def test_count_refuses_unknown_tables(store: Store) -> None:
    with pytest.raises(ValidationError, match="unknown table"):
        await store.count("events; DROP TABLE events")


# Registry mirror and audit -----------------------------------------------------


async def test_service_mirror_audits_changes_only(store: Store) -> None:
    crm = ServiceRow(name="crm", kind="webhook", config={"url": "https://crm.example/hook"})
    assert await store.upsert_service(crm, actor="sink") is None
    # The same entry again (a registry snapshot replay): no change, no audit.
    later = ServiceRow(name="crm", kind="webhook", config={"url": "https://crm.example/hook"})
    assert await store.upsert_service(later, actor="sink") is not None
    assert await store.count(Table.AUDIT_LOG) == 1

    moved = ServiceRow(
        name="crm", kind="webhook", config={"url": "https://crm.example/v2"}, status="disabled"
    )
    before = await store.upsert_service(moved, actor="cli")
    assert before is not None and before.config == {"url": "https://crm.example/hook"}
    [svc] = await store.list_services()
    assert svc.status == "disabled" and svc.created_at == crm.created_at

    deleted = await store.delete_service("crm", actor="cli")
    assert deleted is not None and deleted.status == "disabled"
    assert await store.delete_service("crm", actor="cli") is None
    assert await store.list_services() == []

    audit = await store.query_audit(entity="service:crm")
    assert [a.action for a in audit] == ["service.delete", "service.update", "service.create"]
    assert audit[1].before["config"] == {"url": "https://crm.example/hook"}
    assert audit[1].after == {
        "name": "crm",
        "kind": "webhook",
        "config": {"url": "https://crm.example/v2"},
        "status": "disabled",
    }
    assert audit[0].after is None and audit[2].before is None
    assert audit[0].actor == "cli" and audit[2].actor == "sink"
    assert audit[0].at.tzinfo is not None


async def test_propagation_mirror_and_plain_audit(store: Store) -> None:
    p = PropagationRow(id="p1", mode="multicast", source="shop", targets=["crm", "erp"])
    assert await store.upsert_propagation(p) is None  # no actor: no audit
    assert await store.count(Table.AUDIT_LOG) == 0
    narrowed = PropagationRow(
        id="p1", mode="multicast", source="shop", targets=["crm"], types="order.*"
    )
    await store.upsert_propagation(narrowed, actor="sink")
    [row] = await store.list_propagations()
    assert row.targets == ["crm"] and row.types == "order.*"
    assert (await store.delete_propagation("p1", actor="sink")) is not None
    assert await store.list_propagations() == []

    audit_id = await store.append_audit("alice", "keys.rotate", "keys", {"v": 1}, {"v": 2})
    audit = await store.query_audit(limit=10)
    assert audit[0].id == audit_id and audit[0].before == {"v": 1}
    assert [a.action for a in audit] == ["keys.rotate", "propagation.delete", "propagation.update"]


async def test_audit_with_a_ref_is_appended_once(store: Store) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = await store.append_audit(
        "apikey:0123456789ab", "target.create", "target:crm", None, {"name": "crm"}, ref="r1", at=at
    )
    again = await store.append_audit(
        "apikey:0123456789ab", "target.create", "target:crm", None, {"name": "crm"}, ref="r1", at=at
    )
    assert first is not None and again is None
    [row] = await store.query_audit(entity="target:crm")
    assert (row.actor, row.at, row.after) == ("apikey:0123456789ab", at, {"name": "crm"})


# Key rotation helpers ----------------------------------------------------------


async def test_iter_and_update_payloads(store: Store) -> None:
    rows = [event(n) for n in range(10)] + [event(50, encrypted=False, payload=b"plain")]
    await store.write_batch(rows, dead_letters=[dead_letter(1)])

    seen = [i async for i, _ in store.iter_payloads(Table.EVENTS, batch_size=3)]
    assert seen == [f"evt-{n:05d}" for n in range(10)]  # plaintext row left out
    resumed = [i async for i, _ in store.iter_payloads("events", after_id="evt-00006")]
    assert resumed == ["evt-00007", "evt-00008", "evt-00009"]

    updated = await store.update_payloads(
        Table.EVENTS, [(i, b"rotated-" + i.encode()) for i in seen[:4]] + [("missing", b"x")]
    )
    assert updated == 4
    got = await store.get_event("evt-00002")
    assert got is not None and got.payload == b"rotated-evt-00002"

    dead = [p async for _, p in store.iter_payloads(Table.DEAD_LETTERS)]
    assert dead == [b"gAAAAA-dead-1"]
    with pytest.raises(ValidationError, match="no payload"):
        [_ async for _ in store.iter_payloads(Table.DELIVERIES)]
    with pytest.raises(ValidationError, match="no payload"):
        await store.update_payloads(Table.DELIVERIES, [("x", b"y")])


# Opening, closing, faults -------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["mysql://root@localhost/db", "sqlite://relative.db", "nonsense", "sqlite:///"]
)
async def test_bad_urls_are_one_clear_line(url: str) -> None:
    with pytest.raises(StorageError) as info:
        await open_store(url)
    message = str(info.value)
    assert "\n" not in message
    assert "sqlite" in message.lower() or "url" in message.lower()


async def test_unwritable_sqlite_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create the directory"):
        await open_store(f"sqlite:///{blocker / 'sub' / 'mesh.db'}")


async def test_sqlite_memory_and_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await open_store("sqlite:///:memory:") as mem:
        assert await mem.migrate() == [1, 2, 3, 4]
        await mem.write_batch([event(1)])
        assert await mem.count(Table.EVENTS) == 1
    monkeypatch.chdir(tmp_path)
    async with await open_store("sqlite:///data/rel.db") as rel:
        await rel.migrate()
    assert (tmp_path / "data" / "rel.db").exists()


async def test_sqlite_file_removed_underneath_is_an_error_not_a_silent_loss(
    tmp_path: Path,
) -> None:
    db = tmp_path / "gone.db"
    async with await open_store(f"sqlite:///{db}") as s:
        await s.migrate()
        await s.write_batch([event(1)])
        remove_files(tmp_path, "gone.db")
        with pytest.raises(StorageError, match="removed or replaced"):
            await s.ping()
        with pytest.raises(StorageError, match="removed or replaced"):
            await s.write_batch([event(2)])


async def test_close_twice_and_use_after_close(db_url: str) -> None:
    s = await open_store(db_url)
    await s.migrate()
    await s.close()
    await s.close()
    with pytest.raises(StorageError, match="closed"):
        await s.count(Table.EVENTS)


@pytest.mark.postgres
async def test_postgres_unreachable_is_one_clear_line() -> None:
    async with TCPProxy("127.0.0.1", 9) as proxy:
        proxy.trigger_connectivity_loss()
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            await open_store(
                f"postgresql://postgres:secret@127.0.0.1:{proxy.port}/test", connect_timeout=2
            )
    message = str(info.value)
    assert "unreachable" in message and "\n" not in message
    assert "secret" not in message
    assert time.monotonic() - started < 10


@pytest.fixture
async def pg_url(tmp_path: Path) -> AsyncIterator[str]:
    async with scratch_db("postgres", tmp_path) as url:
        yield url


@pytest.mark.postgres
async def test_postgres_connectivity_loss_and_recovery(pg_url: str) -> None:
    async with TCPProxy(*pg_target(pg_url)) as proxy:
        url = via(pg_url, "127.0.0.1", proxy.port)
        async with await open_store(url, pool_size=3, connect_timeout=2) as s:
            await s.migrate()
            assert (await s.write_batch([event(n) for n in range(10)])).events == 10

            proxy.trigger_connectivity_loss()
            with pytest.raises(StorageError) as info:
                await s.write_batch([event(n) for n in range(5, 20)])
            assert "unreachable" in str(info.value) and "\n" not in str(info.value)
            with pytest.raises(StorageError):
                await s.ping()

            proxy.restore_connectivity()
            await s.ping()
            # The failed batch rolled back entirely; writing it again stores the rest once.
            assert (await s.write_batch([event(n) for n in range(5, 20)])).events == 10
            assert await s.count(Table.EVENTS) == 20

            # Blackhole: connections hang instead of failing; the timeout turns that into
            # a StorageError, and the store recovers the same way.
            proxy.trigger_connectivity_loss("blackhole")
            started = time.monotonic()
            with pytest.raises(StorageError, match="unreachable"):
                await s.ping()
            assert time.monotonic() - started < 10
            proxy.restore_connectivity()
            await s.ping()
            assert await s.count(Table.EVENTS) == 20

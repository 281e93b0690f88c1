"""Retention on both backends: ``Store.prune``, the sink's periodic prune, ``mesh events prune``.

Rows carry explicit times around a fixed cutoff instead of waiting for them to age.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
import structlog
from prometheus_client import REGISTRY
from structlog.testing import LogCapture

from mesh.config import Settings
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
from services.sink.retention import Retention
from services.sink.service import Sink
from tests.support import eventually, running
from tests.support.cli import mesh, ok, one_line_error

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


# The sink ------------------------------------------------------------------------------


def pruned_metric(table: str) -> float:
    return REGISTRY.get_sample_value("mesh_sink_rows_pruned_total", {"table": table}) or 0.0


async def test_sink_prunes_by_its_settings_soon_after_start(
    settings: Settings, db_url: str, store: Store
) -> None:
    now = datetime.now(UTC)
    await store.write_batch(
        events=[event("old", now - timedelta(days=31)), event("new", now - timedelta(days=29))],
        deliveries=[
            attempt("a-old", "old", now - timedelta(days=31)),
            attempt("a-new", "new", now - timedelta(days=29)),
        ],
        health_checks=[health(1, now - timedelta(days=8)), health(2, now - timedelta(days=6))],
        dead_letters=[dead("d-old", now - timedelta(days=400))],
    )
    before = {t: pruned_metric(t) for t in ("events", "deliveries", "health_checks")}
    sink = Sink(settings.model_copy(update={"db_url": db_url}), fetch_wait=0.2)
    sink.retention.first_delay = 0  # defaults: events 30 d, heartbeats 7 d, dead letters kept
    async with running(sink):
        await eventually(lambda: sink.retention.prunes, 15, "the first prune")
    assert await ids(store, "events") == {"new"}
    assert await delivery_ids(store, "old", "new") == {"a-new"}
    # The 8-day-old sample went, the 6-day-old one stayed (the sink adds its own new ones).
    week, five_days = now - timedelta(days=7), now - timedelta(days=5)
    assert (await store.prune(health_checks_before=week, dry_run=True)).health_checks == 0
    assert (await store.prune(health_checks_before=five_days, dry_run=True)).health_checks == 1
    assert await ids(store, "dead_letters") == {"d-old"}
    assert sink.retention.pruned == 3
    assert pruned_metric("events") - before["events"] == 1
    assert pruned_metric("deliveries") - before["deliveries"] == 1
    assert pruned_metric("health_checks") - before["health_checks"] == 1


async def test_retention_zero_keeps_everything(store: Store) -> None:
    await seed(store)
    before = {t: await store.count(t) for t in Table}
    forever = Settings(
        event_retention_days=0, health_retention_days="", dead_letter_retention_days=0
    )
    # A logger of its own: the global configuration may filter info lines (another test
    # configured logging at a higher level), and capture_logs keeps that filter.
    logs = LogCapture()
    log = structlog.wrap_logger(
        None, processors=[logs], wrapper_class=structlog.make_filtering_bound_logger(0)
    )
    retention = Retention(forever, lambda: store, asyncio.Event(), log)
    assert not retention.enabled  # the sink starts no prune task at all
    result = await retention.prune_once(now=NEW + timedelta(days=10_000))
    assert result is not None and result.total == 0
    assert {t: await store.count(t) for t in Table} == before
    [line] = [entry for entry in logs.entries if entry["event"] == "pruned"]
    assert line["events"] == line["deliveries"] == line["health_checks"] == 0


# mesh events prune ---------------------------------------------------------------------


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> CompletedProcess[str]:
    """``mesh ARGS`` in this process (a subprocess costs a second of imports each), off the
    event loop: the command runs its own. Settings come from the environment."""
    from mesh.cli import main

    def call() -> int:
        try:
            main(list(args))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        return 0

    code = await asyncio.to_thread(call)
    out, err = capsys.readouterr()
    return CompletedProcess(list(args), code, out, err)


@pytest.fixture
def cli_env(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MESH_DB_URL", db_url)


@pytest.mark.usefixtures("cli_env")
async def test_cli_prune_dry_run_confirmation_and_yes(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(store)
    before = {t: await store.count(t) for t in Table}
    cut = CUT.isoformat()

    dry = ok(await cli(capsys, "events", "prune", "--older-than", cut, "--dry-run", "--json"))
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True and doc["cutoffs"]["events"] == cut
    assert doc["counts"] == {"events": 2, "deliveries": 3}
    assert {t: await store.count(t) for t in Table} == before

    # No terminal to ask on and no --yes: refused, nothing deleted.
    refused = await cli(capsys, "events", "prune", "--older-than", cut)
    one_line_error(refused, "pass --yes", "2 event(s), 3 delivery attempt(s)")
    assert {t: await store.count(t) for t in Table} == before

    done = ok(
        await cli(
            capsys, "events", "prune", "--older-than", cut, "--health-older-than", cut, "--yes"
        )
    )
    assert "pruned 2 event(s), 3 delivery attempt(s), 2 heartbeat sample(s)" in done.stdout
    assert await store.count(Table.EVENTS) == before[Table.EVENTS] - 2
    assert await store.count(Table.DEAD_LETTERS) == before[Table.DEAD_LETTERS]

    again = ok(await cli(capsys, "events", "prune", "--older-than", cut, "--yes", "--json"))
    assert json.loads(again.stdout)["counts"] == {"events": 0, "deliveries": 0}

    # The bare group still lists events.
    listed = ok(await cli(capsys, "events", "--json", "--limit", "100"))
    assert {e["id"] for e in json.loads(listed.stdout)} == await ids(store, "events")


async def test_cli_prune_bad_input_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    cases = [
        ([], "nothing to prune", 1),
        (["--older-than", "30"], "--older-than: invalid time '30'", 1),
        (["--older-than", "0d"], "invalid duration '0d'", 1),
        (["--health-older-than", "2999-01-01T00:00:00Z"], "is in the future", 1),
        (["--older-than", "30d", "--batch-size", "0"], "--batch-size", 2),
    ]
    for args, expected, code in cases:
        proc = await cli(capsys, "events", "prune", *args)
        one_line_error(proc, expected)
        assert proc.returncode == code, (args, proc.returncode)
    assert not (tmp_path / "home").exists()  # refused before touching the database

    # And through the real entry point once: no traceback, one line, exit 1.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_HOME=str(tmp_path / "home"), MESH_CONFIG=str(tmp_path / "none.toml"))
    one_line_error(await mesh(env, "events", "prune", "--older-than", "soon"), "--older-than")


def test_retention_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.config import load_settings
    from mesh.errors import ConfigError

    defaults = load_settings()
    assert (defaults.event_retention_days, defaults.health_retention_days) == (30, 7)
    assert defaults.dead_letter_retention_days == 0
    assert defaults.retention_cutoffs(CUT) == {
        "events_before": CUT - timedelta(days=30),
        "health_checks_before": CUT - timedelta(days=7),
        "dead_letters_before": None,
    }
    monkeypatch.setenv("MESH_EVENT_RETENTION_DAYS", "")
    monkeypatch.setenv("MESH_HEALTH_RETENTION_DAYS", "0")
    assert not load_settings().retention_enabled
    monkeypatch.setenv("MESH_HEALTH_RETENTION_DAYS", "-1")
    with pytest.raises(ConfigError, match="MESH_HEALTH_RETENTION_DAYS"):
        load_settings()

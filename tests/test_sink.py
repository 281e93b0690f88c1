"""The sink against a real nats-server and both database backends.

Every event lands exactly once, whatever happens to the sink (SIGKILL), the
database (cut through a proxy) or the broker (restarted), and no payload is
stored in plaintext.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgpack
import pytest

from mesh.broker import EmbeddedBroker
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.records import DeliveryRecord, Outcome, batch_bodies, dead_letter_headers, new_id
from mesh.registry import PropagationMode, Target, TargetKind
from mesh.storage import RowsRefused, Store, Table, open_store
from services.sink.service import Sink
from tests.conftest import env_for
from tests.support import eventually, pg_target, remove_files, scratch_db, via
from tests.support.proxy import TCPProxy

ROOT = Path(__file__).resolve().parent.parent
MARKER = "PLAINTEXT-CANARY-7f3a"


@pytest.fixture
def sink_settings(settings: Settings, db_url: str) -> Settings:
    return settings.model_copy(update={"db_url": db_url, "heartbeat_interval_s": 0.5})


@pytest.fixture
async def sink(sink_settings: Settings, client: MeshClient) -> AsyncIterator[Sink]:
    svc = Sink(sink_settings, batch_size=100, fetch_wait=0.2)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


# Each poll is a database read or a look at the sink: every 0.1 s is often enough.
wait_for = functools.partial(eventually, interval=0.1)


async def wait_count(store: Store, table: Table, n: int, timeout: float = 30.0) -> None:
    async def reached() -> bool:
        return await store.count(table) >= n

    await wait_for(reached, timeout, f"{n} rows in {table}")


async def publish(client: MeshClient, n: int, start: int = 0, source: str = "shop") -> list[str]:
    events = [
        client.build(source, "order.created", {"n": i, "note": MARKER}, id=f"e-{i:06d}")
        for i in range(start, start + n)
    ]
    await client.publish_many(events)
    return [e.id for e in events]


async def publish_paced(client: MeshClient, n: int, step: int = 100) -> None:
    """``n`` events as ``publish`` makes them, ``step`` at a time, 20 ms apart."""
    for start in range(0, n, step):
        await publish(client, min(step, n - start), start=start)
        await asyncio.sleep(0.02)


# Events, records, dead letters ----------------------------------------------------


async def test_every_event_stored_once_as_ciphertext(
    client: MeshClient, sink: Sink, store: Store
) -> None:
    ids = await publish(client, 250)
    await publish(client, 50)  # the same ids again: JetStream dedupes within its window
    await wait_count(store, Table.EVENTS, 250)
    await asyncio.sleep(0.5)
    assert await store.count(Table.EVENTS) == 250

    row = await store.get_event(ids[7])
    assert row is not None
    assert (row.source, row.type, row.subject) == (
        "shop",
        "order.created",
        "mesh.evt.shop.order.created",
    )
    assert row.encrypted and row.stream_seq is not None
    assert row.datacontenttype == "application/msgpack" and row.origin == "shop"
    assert MARKER.encode() not in row.payload
    assert msgpack.unpackb(client.keyring.decrypt(row.payload)) == {"n": 7, "note": MARKER}
    assert sink.db_ok and sink.counts["events"] == 250


async def test_delivery_records_and_dead_letters(
    client: MeshClient, sink: Sink, store: Store
) -> None:
    [event_id] = await publish(client, 1)
    for attempt, outcome, code in [(1, Outcome.RETRY, 503), (2, Outcome.DEAD, 500)]:
        await client.deliveries.record(
            DeliveryRecord(
                event_id=event_id,
                target="crm",
                attempt=attempt,
                outcome=outcome,
                status_code=code,
                latency_ms=12.5,
                error=f"HTTP {code}",
                instance="egress-1",
            )
        )
    # A dead letter is the original message, body untouched, plus why it died.
    original = await client.js.get_msg(client.names.events, 1)
    assert original.subject is not None and original.data is not None
    headers = dead_letter_headers(original.subject, original.headers, "crm", "HTTP 500", 2)
    await client.js.publish(client.subjects.dlq("crm"), original.data, headers=headers)

    await wait_count(store, Table.DELIVERIES, 2)
    await wait_count(store, Table.DEAD_LETTERS, 1)
    attempts = await store.query_deliveries(event_id)
    assert [(d.attempt, d.outcome, d.status_code) for d in attempts] == [
        (1, "retry", 503),
        (2, "dead", 500),
    ]
    assert attempts[0].at.tzinfo is not None and attempts[0].instance == "egress-1"
    [dead] = await store.query_dead_letters(target="crm")
    assert (dead.event_id, dead.attempts, dead.last_error) == (event_id, 2, "HTTP 500")
    assert dead.encrypted and dead.payload == original.data
    assert dead.stream_seq == 1


async def test_batched_and_single_delivery_records_both_land(
    client: MeshClient, sink: Sink, store: Store
) -> None:
    """The egress's batch of attempts (one message) and an older single record."""
    [event_id] = await publish(client, 1)
    batch = [
        DeliveryRecord(event_id, "crm", 1, Outcome.RETRY, 503, 4.5, "HTTP 503", "egress-2"),
        DeliveryRecord(event_id, "crm", 2, Outcome.DELIVERED, 200, 3.0, None, "egress-2"),
    ]
    [body] = batch_bodies(batch)
    await client.js.publish(
        client.subjects.delivery("crm"), body, headers={"Nats-Msg-Id": "b-" + new_id()}
    )
    old = DeliveryRecord(event_id, "erp", 1, Outcome.DELIVERED, 204, 1.0, None, "egress-1")
    await client.deliveries.record(old)  # one record per message, as before batches

    await wait_count(store, Table.DELIVERIES, 3)
    attempts = await store.query_deliveries(event_id)
    assert sorted((d.target, d.attempt, d.outcome, d.status_code, d.id) for d in attempts) == [
        ("crm", 1, "retry", 503, batch[0].id),
        ("crm", 2, "delivered", 200, batch[1].id),
        ("erp", 1, "delivered", 204, old.id),
    ]

    # Both messages acked: nothing left pending or in flight on the sink's consumer.
    async def settled() -> bool:
        info = await client.js.consumer_info(client.names.sys, "sink-sys")
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_for(settled, 10, "both record messages acked")
    assert sink.counts["terminated"] == 0


async def test_undecodable_messages_are_kept_or_dropped_never_retried(
    client: MeshClient, sink: Sink, store: Store
) -> None:
    js = client.js
    # Not a delivery record: terminated, and the record after it still lands.
    await js.publish("mesh.sys.delivery.crm", b"\xff not json")
    good = DeliveryRecord(event_id="x", target="crm", attempt=1, outcome=Outcome.DELIVERED)
    await client.deliveries.record(good)
    # A plain message (what `nats pub` sends): stored with the id JetStream knows it by.
    await js.publish("mesh.evt.legacy.thing.happened", b'{"a":1}', headers={"Nats-Msg-Id": "p-1"})
    # A CloudEvent whose headers fail the checks: stored as found.
    bad = {"ce-id": "bad-1", "ce-specversion": "0.3", "ce-source": "shop", "ce-type": "t.x"}
    await js.publish("mesh.evt.shop.t.x", b"body", headers=bad)
    # A dead letter without its mesh-dlq-* headers: kept, the payload is what matters.
    await js.publish("mesh.dlq.erp", b"gAAAA-token", headers={"Nats-Msg-Id": "raw-dlq"})

    await wait_count(store, Table.EVENTS, 2)
    await wait_count(store, Table.DELIVERIES, 1)
    await wait_count(store, Table.DEAD_LETTERS, 1)
    plain = await store.get_event("p-1")
    assert plain is not None and (plain.source, plain.type) == ("legacy", "thing.happened")
    assert not plain.encrypted and plain.payload == b'{"a":1}'
    odd = await store.get_event("bad-1")
    assert odd is not None and odd.payload == b"body"
    [dl] = await store.query_dead_letters()
    assert (dl.id, dl.target, dl.payload) == ("raw-dlq", "erp", b"gAAAA-token")

    await wait_for(lambda: sink.counts["terminated"] == 1, 10, "the bad record termed")
    info = await js.consumer_info(client.names.sys, "sink-sys")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_row_the_database_refuses_is_dropped_the_rest_stored(
    client: MeshClient, sink: Sink, store: Store
) -> None:
    assert sink.store is not None
    real = sink.store.write_batch

    async def picky(events: Any = (), *rest: Any, **named: Any) -> Any:
        events = list(events)
        if any(e.id == "e-000003" for e in events):
            raise RowsRefused("database write refused: poison")
        return await real(events, *rest, **named)

    sink.store.write_batch = picky  # type: ignore[method-assign]
    await publish(client, 10)
    await wait_count(store, Table.EVENTS, 9)
    await wait_for(lambda: sink.counts["refused"] == 1, 10, "the refusal")
    assert await store.get_event("e-000003") is None
    assert await store.count(Table.EVENTS) == 9

    async def settled() -> bool:
        info = await client.js.consumer_info(client.names.events, "sink-events")
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_for(settled, 10, "every message acked or termed")


# No plaintext at rest ------------------------------------------------------------------


async def test_database_holds_no_plaintext(
    client: MeshClient, sink: Sink, store: Store, db_url: str
) -> None:
    await publish(client, 100)
    await wait_count(store, Table.EVENTS, 100)
    await store.close()
    await sink.stop()
    if db_url.startswith("sqlite"):
        db = Path(db_url.removeprefix("sqlite:///"))
        files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
        assert files
        for path in files:
            assert MARKER.encode() not in path.read_bytes(), path
    else:
        conn = await asyncpg.connect(db_url)
        try:
            hits = await conn.fetchval(
                "SELECT count(*) FROM events WHERE position($1::bytea in payload) > 0"
                " OR events::text LIKE '%' || $2 || '%'",
                MARKER.encode(),
                MARKER,
            )
            total = await conn.fetchval("SELECT count(*) FROM events")
        finally:
            await conn.close()
        assert (hits, total) == (0, 100)


# Faults ------------------------------------------------------------------------------------


def start_sink_process(settings: Settings, db_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = env_for(settings)
    env["MESH_DB_URL"] = db_url
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.sink"], cwd=ROOT, env=env, stdout=out, stderr=out
        )


@pytest.mark.slow
async def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(
    client: MeshClient, settings: Settings, db_url: str, store: Store, tmp_path: Path
) -> None:
    n = 3000
    log = tmp_path / "sink.log"
    proc = start_sink_process(settings, db_url, log)
    try:
        # Published in steps (a few ms apart), so the kill lands while events are still
        # coming: published at once, a quiet machine's sink stored all 3,000 between two
        # polls of the count and the kill found nothing left to interrupt.
        publisher = asyncio.create_task(publish_paced(client, n))
        await wait_count(store, Table.EVENTS, 200, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await publisher
        stored_at_kill = await store.count(Table.EVENTS)
        assert stored_at_kill < n, "the sink finished before it was killed: raise n"

        proc = start_sink_process(settings, db_url, log)
        await wait_count(store, Table.EVENTS, n, timeout=60)
        await asyncio.sleep(1.0)
        assert await store.count(Table.EVENTS) == n
        info = await client.js.consumer_info(client.names.events, "sink-events")
        assert info.num_pending == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-2000:]


@pytest.mark.postgres
@pytest.mark.slow
async def test_database_cut_loses_and_duplicates_nothing(
    client: MeshClient, settings: Settings, tmp_path: Path
) -> None:
    async with scratch_db("postgres", tmp_path) as url, TCPProxy(*pg_target(url)) as proxy:
        cut_url = via(url, "127.0.0.1", proxy.port)
        svc = Sink(settings.model_copy(update={"db_url": cut_url}), batch_size=50, fetch_wait=0.2)
        await svc.start()
        direct = await open_store(url)
        try:
            await publish(client, 200)
            await wait_count(direct, Table.EVENTS, 200)

            proxy.trigger_connectivity_loss()
            await publish(client, 300, start=200)
            await wait_for(lambda: not svc.db_ok, 15, "the sink to notice")
            await asyncio.sleep(1.0)
            assert await direct.count(Table.EVENTS) == 200
            info = await client.js.consumer_info(client.names.events, "sink-events")
            assert info.num_ack_pending > 0 or info.num_pending > 0  # held, not acked

            proxy.restore_connectivity()
            await wait_count(direct, Table.EVENTS, 500, timeout=60)
            await wait_for(lambda: svc.db_ok, 15, "db_ok again")
            await asyncio.sleep(0.5)
            assert await direct.count(Table.EVENTS) == 500
            ids = {e.id for e in await direct.query_events(limit=1000)}
            assert ids == {f"e-{i:06d}" for i in range(500)}
        finally:
            await direct.close()
            await svc.stop()


@pytest.mark.slow
async def test_pull_loops_survive_a_broker_restart(
    broker: EmbeddedBroker, client: MeshClient, sink: Sink, store: Store
) -> None:
    await publish(client, 50)
    await wait_count(store, Table.EVENTS, 50)
    broker.stop()
    await asyncio.sleep(0.5)
    await broker.astart()
    await wait_for(lambda: client.nc.is_connected, 30, "the test client to reconnect")
    await wait_for(lambda: sink.client.nc.is_connected, 30, "the sink to reconnect")
    for attempt in range(20):
        try:
            await publish(client, 50, start=50)
            break
        except Exception:
            if attempt == 19:
                raise
            await asyncio.sleep(0.5)
    await wait_count(store, Table.EVENTS, 100, timeout=60)


async def test_two_sinks_store_each_event_once(
    client: MeshClient, sink_settings: Settings, store: Store
) -> None:
    sinks = [Sink(sink_settings, batch_size=50, fetch_wait=0.2) for _ in range(2)]
    for s in sinks:
        await s.start()
    try:
        await publish(client, 2000)
        await wait_count(store, Table.EVENTS, 2000, timeout=60)
        await asyncio.sleep(0.5)
        assert await store.count(Table.EVENTS) == 2000
        assert sum(s.counts["events"] for s in sinks) == 2000
        assert all(s.counts["messages"] > 0 for s in sinks), [s.counts for s in sinks]
    finally:
        for s in sinks:
            await s.stop()


# Registry mirror, heartbeats, readiness -------------------------------------------------


async def test_registry_mirror_with_audit(client: MeshClient, sink: Sink, store: Store) -> None:
    await client.add_target(Target(name="crm", kind=TargetKind.NATS))
    prop = await client.add_propagation(PropagationMode.UNIDIRECTIONAL, "shop", ["crm"])

    async def mirrored() -> bool:
        return len(await store.list_services()) == 1 and len(await store.list_propagations()) == 1

    await wait_for(mirrored, 15, "the registry mirror")
    [svc] = await store.list_services()
    assert (svc.name, svc.kind, svc.status) == ("crm", "nats", "active")
    assert "secret_enc" not in svc.config
    [p] = await store.list_propagations()
    assert (p.id, p.mode, p.source, p.targets) == (prop.id, "unidirectional", "shop", ["crm"])

    await client.remove_target("crm")

    async def gone() -> bool:
        return not await store.list_services() and not await store.list_propagations()

    await wait_for(gone, 15, "the removal to be mirrored")
    actions = sorted(a.action for a in await store.query_audit(limit=20))
    assert actions == [
        "propagation.create",
        "propagation.delete",
        "service.create",
        "service.delete",
    ]
    # A resync of an unchanged registry writes no audit rows.
    await sink.resync_registry()
    assert await store.count(Table.AUDIT_LOG) == 4


async def test_heartbeats_sampled_into_health_checks(sink: Sink, store: Store) -> None:
    async def stored() -> bool:
        rows = await store.count(Table.HEALTH_CHECKS)
        return rows >= 1

    await wait_for(stored, 15, "a heartbeat row")
    assert sink.stats()["db_ok"] is True


async def test_sqlite_file_deleted_while_running_is_created_again(
    client: MeshClient, settings: Settings, tmp_path: Path
) -> None:
    db = tmp_path / "again.db"
    svc = Sink(settings.model_copy(update={"db_url": f"sqlite:///{db}"}), fetch_wait=0.2)
    svc.db_check_interval = 0.2
    await svc.start()
    try:
        await publish(client, 5)
        await wait_for(lambda: svc.counts["events"] == 5, 15, "the first events")
        remove_files(tmp_path, "again.db")
        await wait_for(lambda: db.exists(), 15, "the file to be created again")
        await publish(client, 5, start=5)
        async with await open_store(f"sqlite:///{db}") as fresh:
            await fresh.migrate()  # the sink may not have got to it yet
            await wait_count(fresh, Table.EVENTS, 5)
            assert {e.id for e in await fresh.query_events()} == {
                f"e-{i:06d}" for i in range(5, 10)
            }
    finally:
        await svc.stop()


async def test_bad_database_url_fails_at_start(settings: Settings) -> None:
    from mesh.errors import StorageError

    svc = Sink(settings.model_copy(update={"db_url": "mysql://nope"}))
    with pytest.raises(StorageError, match="unsupported database URL"):
        await svc.start()
    await svc.close()


# CLI ---------------------------------------------------------------------------------------


def test_cli_events_and_deliveries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mesh.cli import main
    from mesh.crypto import KeyRing
    from mesh.storage import DeliveryRow, EventRow

    home = tmp_path / "home"
    monkeypatch.setenv("MESH_HOME", str(home))
    ring = KeyRing.load(home / "keys" / "encryption.key")
    t = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    async def seed() -> None:
        async with await open_store(f"sqlite:///{home / 'mesh.db'}") as s:
            await s.migrate()
            await s.write_batch(
                [
                    EventRow(
                        id="e1",
                        subject="mesh.evt.shop.order.created",
                        source="shop",
                        type="order.created",
                        time=t,
                        payload=ring.encrypt(msgpack.packb({"total": 42})),
                        encrypted=True,
                        datacontenttype="application/msgpack",
                        stream_seq=1,
                    )
                ],
                [
                    DeliveryRow(
                        id="a1",
                        event_id="e1",
                        target="crm",
                        attempt=1,
                        outcome="delivered",
                        at=t,
                        trace_id="0af7651916cd43dd8448eb211c80319c",
                    )
                ],
            )

    asyncio.run(seed())
    main(["events", "--json"])
    [doc] = json.loads(capsys.readouterr().out)
    assert doc["id"] == "e1" and doc["data"] == {"total": 42}

    main(["events", "--source", "shop", "--type", "order.*"])
    assert "e1" in capsys.readouterr().out

    main(["deliveries", "--event", "e1", "--json"])
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert out["event"]["data"] == {"total": 42}
    assert [d["outcome"] for d in out["deliveries"]] == ["delivered"]
    assert out["deliveries"][0]["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    main(["deliveries", "--event", "e1"])
    assert "0af7651916cd43dd8448eb211c80319c" not in capsys.readouterr().out
    main(["deliveries", "--event", "e1", "--trace"])
    assert "0af7651916cd43dd8448eb211c80319c" in capsys.readouterr().out

    with pytest.raises(SystemExit) as info:
        main(["deliveries", "--event", "nope"])
    assert info.value.code == 1
    assert "no event 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["events", "--source", "Bad Name"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid source name" in err

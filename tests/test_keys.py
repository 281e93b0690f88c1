"""Key rotation against a real nats-server and a real SQLite store written by the real sink."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh import keys as key_ops
from mesh import reencrypt as reencrypt_ops
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.crypto import KeyRing
from mesh.registry import Target, TargetKind
from mesh.storage import Store, Table
from services.sink.service import Sink
from tests.conftest import add_nats_target
from tests.support import migrated_store, pg_schema
from tests.support.cli import assert_one_line_errors, one_line_error, run_cli
from tests.test_replay import drain


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_settings(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[Settings]:
    """The test's settings with its database: SQLite in the home, or a scratch PG schema."""
    if request.param == "sqlite":
        yield settings
        return
    dsn = request.getfixturevalue("pg_dsn")  # skips when PostgreSQL is not configured
    async with pg_schema(dsn) as url:
        yield settings.model_copy(update={"db_url": url})


@pytest.fixture
async def store(db_settings: Settings) -> AsyncIterator[Store]:
    async with migrated_store(db_settings.db_url) as s:
        yield s


async def wait_rows(store: Store, table: Table, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while await store.count(table) < n:
        assert time.monotonic() < deadline, f"timed out waiting for {n} rows in {table}"
        await asyncio.sleep(0.1)


async def stored_payloads(store: Store) -> dict[tuple[str, str], bytes]:
    out = {}
    for table in (Table.EVENTS, Table.DEAD_LETTERS):
        async for row_id, payload in store.iter_payloads(table, None, 100):
            out[(table.value, row_id)] = payload
    return out


async def populate(client: MeshClient, settings: Settings, store: Store, n: int, dead: int) -> None:
    """n events to target alpha, the first ``dead`` of them dead-lettered; the sink stores all."""
    await add_nats_target(client, "alpha")
    await client.add_propagation("unidirectional", "shop", ["alpha"])
    events = [client.build("shop", "order.created", {"n": i}) for i in range(n)]
    await client.publish_many(events)
    it = client.consume("alpha", batch=50, expires=0.5)
    for i in range(n):
        d = await anext(it)
        if i < dead:
            await client.deliveries.dead_letter(d.msg, "alpha", "HTTP 503", 3)
        await d.ack()
    await it.aclose()
    sink = Sink(settings, batch_size=100, fetch_wait=0.2)
    await sink.start()
    try:
        await wait_rows(store, Table.EVENTS, n)
        await wait_rows(store, Table.DEAD_LETTERS, dead)
    finally:
        await sink.stop()


async def test_rotate_old_events_decrypt_new_ones_use_the_new_key(
    client: MeshClient, settings: Settings
) -> None:
    await add_nats_target(client, "alpha")
    await client.add_propagation("unidirectional", "shop", ["alpha"])
    old_key = client.keyring.primary.id
    before = await client.publish("shop", "order.created", {"n": 1})

    proc = await run_cli(settings, "keys", "rotate", "--json")
    assert proc.returncode == 0, proc.stderr
    new_key = json.loads(proc.stdout)["primary"]
    ring = KeyRing.load(settings.key_path, create=False)
    assert [k.id for k in ring.keys] == [new_key, old_key]

    async with MeshClient(settings, name="after-rotation") as fresh:
        after = await fresh.publish("shop", "order.created", {"n": 2})
        first = await fresh.js.get_msg(fresh.names.events, 1)
        second = await fresh.js.get_msg(fresh.names.events, 2)
        assert first.data is not None and second.data is not None
        assert ring.key_id_for(first.data) == old_key
        assert ring.key_id_for(second.data) == new_key
        got = await drain(fresh, "alpha", 2)
    assert [(e.id, e.data) for e in got] == [(before, {"n": 1}), (after, {"n": 2})]


async def test_a_running_consumer_follows_a_rotation_made_elsewhere(
    client: MeshClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service that loaded the ring before `mesh keys rotate` neither dead-letters new
    events nor keeps encrypting under the old key."""
    import mesh.crypto

    await add_nats_target(client, "alpha")
    await client.add_propagation("unidirectional", "shop", ["alpha"])
    old_key = client.keyring.primary.id
    assert (await run_cli(settings, "keys", "rotate")).returncode == 0
    async with MeshClient(settings, name="fresh-publisher") as fresh:
        new_key = fresh.keyring.primary.id
        sent = await fresh.publish("shop", "order.created", {"n": 1})
    assert new_key != old_key
    got = await drain(client, "alpha", 1)  # the long-lived client, ring loaded before
    assert [(e.id, e.data) for e in got] == [(sent, {"n": 1})]
    info = await client.js.stream_info(client.names.dlq)
    assert info.state.messages == 0
    monkeypatch.setattr(mesh.crypto, "RELOAD_CHECK_S", 0.0)
    await client.publish("shop", "order.created", {"n": 2})
    last = await client.js.get_msg(client.names.events, 2)
    assert last.data is not None
    assert KeyRing.load(settings.key_path).key_id_for(last.data) == new_key


async def test_reencrypt_resumes_and_leaves_no_row_under_the_old_key(
    client: MeshClient, db_settings: Settings, store: Store
) -> None:
    settings = db_settings
    await populate(client, settings, store, n=25, dead=4)
    old = client.keyring
    plain = {k: old.decrypt(v) for k, v in (await stored_payloads(store)).items()}
    assert len(plain) == 29

    new_key = key_ops.rotate(settings)
    ring = key_ops.load_ring(settings)

    class Interrupted(Exception):
        pass

    def stop_after_first_batch(table: str, done: int, total: int) -> None:
        if table == "events" and done >= 10:
            raise Interrupted

    with pytest.raises(Interrupted):
        await reencrypt_ops.reencrypt(
            settings, ring, None, batch_size=10, progress=stop_after_first_batch
        )
    checkpoint = reencrypt_ops.Checkpoint.for_settings(settings)
    assert checkpoint.path.exists()
    midway = await stored_payloads(store)
    assert sum(ring.key_id_for(p) == new_key.id for p in midway.values()) == 4 + 10

    proc = await run_cli(settings, "keys", "reencrypt", "--batch-size", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["resumed"] is True
    # Only what the first run had not done: no row rewritten twice.
    assert doc["tables"]["events"] == {"rewritten": 15, "current": 0, "undecryptable": 0}
    assert doc["tables"]["dead_letters"]["rewritten"] == 0
    assert not checkpoint.path.exists()

    after = await stored_payloads(store)
    assert {ring.key_id_for(p) for p in after.values()} == {new_key.id}
    assert {k: ring.decrypt(v) for k, v in after.items()} == plain
    # A full pass now finds everything current.
    again = await reencrypt_ops.reencrypt(settings, ring, None, batch_size=10)
    assert again.rewritten == 0 and again.tables["events"].current == 25


@pytest.mark.slow
async def test_prune_refuses_while_anything_stored_needs_the_key(
    client: MeshClient, db_settings: Settings, store: Store
) -> None:
    settings = db_settings
    await populate(client, settings, store, n=6, dead=2)
    await client.add_target(
        Target(name="hook", kind=TargetKind.WEBHOOK, url="https://example.com/hook")
    )
    old_key = client.keyring.primary.id
    assert (await run_cli(settings, "keys", "rotate")).returncode == 0

    refused = await run_cli(settings, "keys", "prune", "--yes")
    line = one_line_error(refused)
    assert f"key {old_key} is still needed" in line
    for held in (
        "1 in registry secrets",
        "6 in stream MESH_EVENTS",
        "2 in stream MESH_DLQ",
        "6 in database table events",
        "2 in database table dead_letters",
    ):
        assert held in line, line
    assert old_key in [k.id for k in KeyRing.load(settings.key_path).keys]

    # Database rows and registry secrets can be rewritten...
    assert (await run_cli(settings, "keys", "reencrypt")).returncode == 0
    usage = await run_cli(settings, "keys", "status", "--usage", "--json")
    stores = json.loads(usage.stdout)["usage"]["stores"]
    assert old_key not in stores["database table events"]
    assert old_key not in stores["registry secrets"]
    # ... retained messages cannot: still refused, and only for them.
    line = one_line_error(await run_cli(settings, "keys", "prune", "--yes"))
    held, _, hint = line.partition(" (")
    assert "6 in stream MESH_EVENTS" in held and "2 in stream MESH_DLQ" in held
    assert "database" not in held and "registry" not in held
    assert "age out" in hint and "mesh dlq replay" in hint and "reencrypt" not in hint

    # The messages go (aged out, purged): now the key can go.
    await client.js.purge_stream(client.names.events)
    assert (await run_cli(settings, "keys", "prune", "--yes")).returncode == 1  # DLQ still
    assert (await run_cli(settings, "dlq", "purge", "--yes")).returncode == 0
    proc = await run_cli(settings, "keys", "prune", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"removed key {old_key}" in proc.stdout
    ring = KeyRing.load(settings.key_path)
    assert old_key not in [k.id for k in ring.keys]
    # Everything stored still opens with what is left.
    assert all(ring.key_id_for(p) for p in (await stored_payloads(store)).values())
    async with MeshClient(settings, name="after-prune") as fresh:
        secrets = fresh.registry.secrets_for(await fresh.registry.get_target("hook"))
        assert len(secrets) == 1 and secrets[0].startswith("whsec_")


def _write_ring(path: Path, age_days: float) -> KeyRing:
    ring = KeyRing.load(path)
    created = datetime.now(UTC) - timedelta(days=age_days)
    aged = [type(k)(id=k.id, created=created, secret=k.secret) for k in ring.keys]
    old = KeyRing(aged, path)
    old.save()
    return old


async def test_status_warns_when_the_primary_is_overdue(settings: Settings) -> None:
    ring = _write_ring(settings.key_path, 100)
    proc = await run_cli(settings, "keys", "status")
    assert proc.returncode == 0, proc.stderr
    assert ring.primary.id in proc.stdout
    assert "warning: primary key" in proc.stderr and "rotation interval of 90 days" in proc.stderr

    doc = json.loads((await run_cli(settings, "keys", "status", "--json")).stdout)
    assert doc["overdue"] is True and doc["keys"][0]["primary"] is True

    relaxed = settings.model_copy(update={"key_rotation_days": 365})
    assert key_ops.key_status(relaxed, ring).warning is None
    assert key_ops.key_status(settings, ring).warning is not None


async def test_bad_input_is_one_line_and_non_zero(settings: Settings, tmp_path: Path) -> None:
    missing = Settings(home=tmp_path / "elsewhere", nats_url=settings.nats_url)
    line = one_line_error(await run_cli(missing, "keys", "status"))
    assert "does not exist (run `mesh init`)" in line

    ring = KeyRing.load(settings.key_path)
    old = ring.primary.id
    ring.rotate()
    cases = [
        (["keys", "prune", "k-nope"], "no key 'k-nope' in the ring", 1),
        (["keys", "prune", ring.primary.id], "is the primary key", 1),
        (["keys", "prune", old], "needs confirmation: pass --yes", 1),
        (["keys", "reencrypt", "--batch-size", "0"], "--batch-size", 2),
        (["keys", "spin"], "No such command", 2),
    ]
    await assert_one_line_errors(settings, cases)
    assert [k.id for k in KeyRing.load(settings.key_path).keys] == [ring.primary.id, old]

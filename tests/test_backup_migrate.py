"""Migration: an archive of one embedded server + SQLite restores onto a 3-node
cluster (streams R3) + PostgreSQL with the same counts, and the targets' feeds
resume where they were."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from mesh.backup import create_backup, restore_archive, verify_archive
from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import Target, TargetKind
from mesh.storage import open_store
from services.sink import Sink
from tests.support import eventually, pg_schema, running
from tests.test_cluster import Cluster

pytestmark = pytest.mark.slow

PASSPHRASE = b"correct horse battery staple"
N_EVENTS = 40
CONSUMED = 15


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    c.start()
    yield c
    c.stop()


async def make_archive(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A small mesh on one embedded server and SQLite, consumed in part, backed up."""
    home = tmp_path / "src"
    settings = Settings(home=home, nats_port=free_port(), http_port=0)
    broker = EmbeddedBroker(settings.nats_store_dir, port=settings.nats_port)
    broker.start()
    try:
        async with MeshClient(settings, name="test") as c:
            await c.init()
            await c.add_target(Target(name="t1", kind=TargetKind.NATS))
            await c.add_propagation("unidirectional", "app", ["t1"])
            async with running(Sink(settings)):
                for n in range(N_EVENTS):
                    await c.publish("app", "order.placed", {"n": n})
                got = 0
                async for d in c.consume("t1", batch=CONSUMED):
                    await d.ack()
                    got += 1
                    if got == CONSUMED:
                        break
                store = await open_store(settings.db_url)
                try:
                    await eventually(
                        lambda: _count(store, "events", N_EVENTS), timeout=30, what="sink rows"
                    )
                finally:
                    await store.close()
        result = await create_backup(settings, tmp_path / "out", PASSPHRASE)
    finally:
        broker.stop()
    return result.path, result.manifest["tables"]


async def wait_for_jetstream(url: str) -> None:
    """The cluster's JetStream answers (a meta leader is elected); no MeshClient, which
    would create a key file in the empty home the restore wants."""
    nc = await nats.connect(url.split(","))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await nc.jetstream().account_info()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)
    finally:
        await nc.close()


async def _count(store: object, table: str, want: int) -> bool:
    return await store.count(table) >= want  # type: ignore[attr-defined, no-any-return]


@pytest.mark.timeout(240)
async def test_sqlite_single_node_archive_restores_onto_cluster_and_postgres(
    tmp_path: Path, cluster: Cluster, pg_dsn: str
) -> None:
    archive, tables = await make_archive(tmp_path)
    verified = await asyncio.to_thread(verify_archive, archive, PASSPHRASE)
    assert verified.manifest["source"] == {"database": "sqlite", "embedded_broker": True}
    async with pg_schema(pg_dsn) as db_url:
        settings = Settings(
            home=tmp_path / "dst", nats_url=cluster.url, db_url=db_url, stream_replicas=3
        )
        await wait_for_jetstream(cluster.url)
        result = await restore_archive(settings, archive, PASSPHRASE)
        want = {k: v["messages"] for k, v in verified.manifest["streams"].items()}
        assert result.streams == want
        assert result.tables == tables
        store = await open_store(db_url)
        try:
            pg_counts = {t: await store.count(t) for t in tables}
        finally:
            await store.close()
        assert pg_counts == tables
        async with MeshClient(settings, name="test") as c:
            for name, n in want.items():
                info = await c.js.stream_info(name)
                assert info.state.messages == n
                assert info.config.num_replicas == 3, name
            assert [t.name for t in await c.registry.list_targets()] == ["t1"]
            # The feed resumes after what was acked before the backup.
            rest = []
            async for d in c.consume("t1", batch=50):
                rest.append(d.event.data["n"])
                await d.ack()
                if len(rest) == N_EVENTS - CONSUMED:
                    break
        assert rest == list(range(CONSUMED, N_EVENTS))
        assert settings.key_path.exists()
        # And back: the cluster + PostgreSQL mesh backs up with the same counts (the
        # tables read in one REPEATABLE READ snapshot, streams from their R3 leaders).
        again = await create_backup(settings, tmp_path / "out2", PASSPHRASE)
        assert again.manifest["source"] == {"database": "postgres", "embedded_broker": False}
        assert again.manifest["tables"] == tables
        assert {k: v["messages"] for k, v in again.manifest["streams"].items()} == want
        assert again.manifest["table_format"] == "rows"
    # That archive (PostgreSQL rows) restores onto one embedded server + SQLite again.
    home = tmp_path / "back"
    back = Settings(home=home, nats_port=free_port())
    result = await restore_archive(back, again.path, PASSPHRASE)
    assert result.tables == tables
    assert result.streams == want
    store = await open_store(back.db_url)
    try:
        assert {t: await store.count(t) for t in tables} == tables
    finally:
        await store.close()
    print(
        f"\nmigrated: streams {want}, tables {pg_counts};"
        f" t1 resumed at event {rest[0]} of {N_EVENTS} ({CONSUMED} acked before the backup)"
    )

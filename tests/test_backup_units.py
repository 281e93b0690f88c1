"""Pure parts of mesh.backup: sealing, the schedule setting, which services `mesh up` runs,
and the scheduled backup service against a real broker."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

import services.backup.service as service_module
from mesh._nats.types import connect
from mesh.backup import SealError, create_backup, jetstream, list_archives, verify_archive
from mesh.backup import recipient as backup_key
from mesh.backup.archive import (
    FORMAT,
    SQLITE_MEMBER,
    ArchiveReader,
    ArchiveWriter,
    prune_archives,
    sha256_file,
)
from mesh.backup.schedule import parse_every
from mesh.backup.seal import seal, unseal
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import ConfigError, ValidationError
from services.backup.service import LAST_SIZE, LAST_SUCCESS, Backup
from services.runner import available_services
from tests.support import eventually, migrated_store, running

FAST_N = 2**14  # the production cost (2**17) is for attackers, not for unit tests
FILES = {"encryption.key": b'{"keys": []}', "bridge.key": b"\x00\x01secret"}


def test_seal_round_trip_and_refusals() -> None:
    blob = seal(FILES, b"a long passphrase", "archive-1", n=FAST_N)
    assert unseal(blob, b"a long passphrase", "archive-1") == FILES
    assert b"secret" not in blob
    with pytest.raises(SealError, match="wrong passphrase"):
        unseal(blob, b"another passphrase", "archive-1")
    with pytest.raises(SealError, match="wrong passphrase"):
        unseal(blob, b"a long passphrase", "archive-2")  # keys bound to their archive
    tampered = bytearray(blob)
    tampered[-5] ^= 0x40
    with pytest.raises(SealError):
        unseal(bytes(tampered), b"a long passphrase", "archive-1")
    with pytest.raises(SealError, match="damaged"):
        unseal(b"not sealed at all", b"a long passphrase", "archive-1")
    with pytest.raises(ValidationError, match="at least"):
        seal(FILES, b"short", "archive-1", n=FAST_N)


def test_a_changed_kdf_header_cannot_ask_for_gigabytes() -> None:
    blob = seal(FILES, b"a long passphrase", "a", n=FAST_N)
    huge = blob.replace(b'"n": 16384', b'"n": 1073741824')
    assert huge != blob
    with pytest.raises(SealError, match="damaged"):
        unseal(huge, b"a long passphrase", "a")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("1d", 86400)]
)
def test_parse_every(text: str, seconds: float) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "0s", "-1h", "1w", "soon"])
def test_parse_every_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="MESH_BACKUP_EVERY"):
        parse_every(text)


def test_mesh_up_runs_backups_only_when_scheduled(tmp_path: Path) -> None:
    assert "backup" not in available_services()
    assert "backup" not in available_services(Settings(home=tmp_path))
    assert "backup" in available_services(Settings(home=tmp_path, backup_every="1h"))


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    names = [f"mesh-backup-2026010{i}T000000Z-abcdef.tar" for i in range(1, 6)]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "unrelated.tar").write_bytes(b"x")
    gone = prune_archives(tmp_path, 2)
    assert [p.name for p in gone] == names[:3]
    assert [p.name for p in list_archives(tmp_path)] == names[3:]
    assert (tmp_path / "unrelated.tar").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_the_backup_service_writes_on_schedule_and_keeps_n(
    settings: Settings, client: MeshClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passfile = tmp_path / "pass"
    passfile.write_text("a long passphrase\n")
    s = settings.model_copy(
        update={"backup_every": "1s", "backup_keep": 2, "backup_passphrase_file": passfile}
    )
    async with migrated_store(s.db_url):
        pass
    await client.publish("app", "x", 1)
    started = time.time()
    svc = Backup(s)
    prepared = 0
    real = backup_key.prepare

    def counting(home: Path, passphrase: bytes | None) -> Any:
        nonlocal prepared
        prepared += 1
        return real(home, passphrase)

    monkeypatch.setattr(service_module.backup_key, "prepare", counting)
    async with running(svc):
        await eventually(lambda: svc.rounds >= 3, timeout=90, interval=0.2, what="3 backups")
    assert prepared == 1  # the backup key is checked once and kept for every round
    kept = list_archives(s.backups_dir)
    assert len(kept) == 2
    assert LAST_SUCCESS._value.get() >= started
    assert LAST_SIZE._value.get() == kept[-1].stat().st_size
    verified = verify_archive(kept[-1], b"a long passphrase")
    assert verified.manifest["streams"]["MESH_EVENTS"]["messages"] == 1


def test_the_backup_service_needs_a_schedule_and_a_passphrase_or_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MESH_BACKUP_EVERY"):
        Backup(Settings(home=tmp_path))
    with pytest.raises(ConfigError, match="needs a backup key"):
        Backup(Settings(home=tmp_path, backup_every="1h"))
    with pytest.raises(ValidationError, match="cannot read the passphrase file"):
        Backup(Settings(home=tmp_path, backup_every="1h", backup_passphrase_file=tmp_path / "x"))
    backup_key.prepare(tmp_path, b"a long passphrase", n=2**14)
    assert Backup(Settings(home=tmp_path, backup_every="1h")).passphrase is None


@pytest.mark.timeout(60)
async def test_consumer_marks_move_with_a_delivery_and_an_ack(
    settings: Settings, client: MeshClient
) -> None:
    """What says whether the SQLite copy taken beside the snapshots is kept."""
    await client.publish("app", "x", 1)
    await client.publish("app", "x", 2)
    nc = await connect(servers=[settings.nats_url])
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("mesh.evt.>", durable="marks-test", stream="MESH_EVENTS")
        streams = ["MESH_EVENTS"]
        first = await jetstream.consumer_marks(nc, streams)
        assert "MESH_EVENTS/marks-test" in first
        assert await jetstream.consumer_marks(nc, streams) == first  # nothing happened
        (msg,) = await sub.fetch(1, timeout=5)
        delivered = await jetstream.consumer_marks(nc, streams)
        assert delivered != first
        await msg.ack_sync()
        assert await jetstream.consumer_marks(nc, streams) != delivered
    finally:
        await nc.close()


@pytest.mark.timeout(60)
async def test_the_sqlite_copy_is_taken_again_when_a_consumer_moved(
    settings: Settings, client: MeshClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await client.publish("app", "x", 1)
    async with migrated_store(settings.db_url):
        pass
    kept = await create_backup(settings, tmp_path / "a", b"a long passphrase")
    assert "tables_again" not in kept.phases  # a quiet mesh: the early copy is kept
    calls = 0
    real = jetstream.consumer_marks

    async def moving(nc: Any, streams: list[str]) -> dict[str, tuple[Any, ...]]:
        nonlocal calls
        calls += 1
        marks = await real(nc, streams)
        return {**marks, "X/sink": (calls,)}  # as if the sink acked during the snapshots

    monkeypatch.setattr(jetstream, "consumer_marks", moving)
    again = await create_backup(settings, tmp_path / "b", b"a long passphrase")
    assert calls == 2
    assert "tables_again" in again.phases
    checked = verify_archive(again.path, b"a long passphrase")
    assert checked.manifest["tables"] == kept.manifest["tables"]


@pytest.mark.parametrize("kernel", [True, False])
def test_a_file_goes_into_the_archive_whole_with_or_without_copy_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool
) -> None:
    if not kernel:

        def refuse(*args: Any) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    data = os.urandom(3 * 1024 * 1024 + 17)
    writer = ArchiveWriter(tmp_path, "a.tar")
    (writer.staging / "tables").mkdir()
    (writer.staging / SQLITE_MEMBER).write_bytes(data)
    writer.put("first", b"x" * 100)
    writer.add_file(SQLITE_MEMBER, sha256_file(writer.staging / SQLITE_MEMBER))
    writer.put("last", b"y")
    path = writer.finish({"format": FORMAT})
    with ArchiveReader(path) as reader:
        assert reader.check_files() == len(data) + 101
        assert reader.read(SQLITE_MEMBER) == data
        assert reader.read("last") == b"y"


@pytest.mark.timeout(90)
async def test_a_restore_into_no_database_puts_the_copy_in_place_or_leaves_nothing(
    settings: Settings, client: MeshClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite onto no database: the verified copy becomes the database file (renamed in
    once the streams are in); a restore whose streams fail leaves no file behind."""
    import sqlite3
    from datetime import UTC, datetime

    import mesh.backup.restore as restore_module
    from mesh.backup import restore_archive
    from mesh.broker import free_port
    from mesh.errors import BrokerError
    from mesh.storage.models import EventRow

    await client.publish("app", "x", 1)
    async with migrated_store(settings.db_url) as store:
        now = datetime.now(UTC)
        rows = [
            EventRow(id=f"e{i}", subject="mesh.evt.app.x", source="app", type="x", time=now,
                     payload=b"p", encrypted=False, stream_seq=i + 1)
            for i in range(3)
        ]  # fmt: skip
        await store.write_batch(events=rows)
    backup_key.prepare(settings.home, b"a long passphrase", n=FAST_N)
    made = await create_backup(settings, tmp_path / "out", None)
    target = Settings(home=tmp_path / "t", nats_port=free_port(), log_level="warning")
    db = tmp_path / "t" / "mesh.db"

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise BrokerError("the server went away")

    monkeypatch.setattr(restore_module, "_restore_streams", broken)
    with pytest.raises(BrokerError, match="went away"):
        await restore_archive(target, made.path, b"a long passphrase")
    assert not db.exists() and not list(db.parent.glob(".mesh.db*"))
    monkeypatch.undo()

    async def no_row_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the copy is the database: no rows are loaded one by one")

    monkeypatch.setattr(restore_module, "_load_tables", no_row_loading)
    done = await restore_archive(target, made.path, b"a long passphrase")
    assert done.tables["events"] == 3
    assert not list(db.parent.glob(".mesh.db*"))
    conn = sqlite3.connect(db)
    try:
        assert sorted(r[0] for r in conn.execute("SELECT id FROM events")) == ["e0", "e1", "e2"]
        assert conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] > 0
    finally:
        conn.close()
    async with migrated_store(target.db_url) as store:  # the mesh's own store opens it
        assert await store.count("events") == 3

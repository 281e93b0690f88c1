"""Power loss on the embedded node (issue #14): acknowledged events survive with sync on,
and the same harness shows the loss with MESH_BROKER_SYNC=lazy (so it can fail).

The 20-round run is ``python -m tests.faults.powerloss --rounds 20``; these are short.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh.durability import SyncMode
from tests.faults.lazyfs import LazyMount, fuse_unavailable
from tests.faults.powerloss import run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(fuse_unavailable() is not None, reason=f"FUSE: {fuse_unavailable()}"),
]


def test_lazyfs_drops_exactly_the_unsynced_writes(tmp_path: Path) -> None:
    mount = LazyMount(tmp_path / "disk", tmp_path / "mnt")
    mount.start()
    try:
        path = tmp_path / "mnt" / "f"
        with path.open("wb") as f:
            f.write(b"synced ")
            f.flush()
            os.fsync(f.fileno())
            f.write(b"lost")
        assert path.read_bytes() == b"synced lost"  # readers see the unsynced write
        (tmp_path / "mnt" / "never-synced").write_bytes(b"gone")
    finally:
        mount.power_loss()
    assert (tmp_path / "disk" / "f").read_bytes() == b"synced "
    assert (tmp_path / "disk" / "never-synced").read_bytes() == b""  # the name survives
    mount.start()
    try:
        assert (tmp_path / "mnt" / "f").read_bytes() == b"synced "
    finally:
        mount.stop()


@pytest.mark.timeout(240)
async def test_sync_always_loses_no_acknowledged_event(tmp_path: Path) -> None:
    results = await run(tmp_path, SyncMode.ALWAYS, rounds=2, publish_s=1.0, rate=200)
    for r in results:
        print(f"round {r.round}: acked {r.acked_total}\n{r.report}")
    assert len(results) == 2
    assert results[-1].acked_total > 100  # the load was real
    for r in results:
        assert r.report["stream"].lost == 0, str(r.report)
        assert r.report["sink.events"].lost == 0, str(r.report)


@pytest.mark.timeout(120)
async def test_lazy_sync_loses_acknowledged_events(tmp_path: Path) -> None:
    """The harness can fail: nats-server's default sync loses what it acknowledged."""
    (r,) = await run(tmp_path, SyncMode.LAZY, rounds=1, publish_s=1.0, rate=200)
    print(r.report)
    assert r.acked_total > 50
    assert r.report["stream"].lost > 0


@pytest.mark.parametrize(("synchronous", "survives"), [("FULL", True), ("NORMAL", False)])
def test_sqlite_wal_commits_survive_power_loss_only_with_full(
    tmp_path: Path, synchronous: str, survives: bool
) -> None:
    """Why the sink runs synchronous=FULL: in WAL mode NORMAL leaves a commit unsynced."""
    import sqlite3

    mount = LazyMount(tmp_path / "disk", tmp_path / "mnt")
    mount.start()
    try:
        db = sqlite3.connect(tmp_path / "mnt" / "t.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the table itself is on disk
        for i in range(50):
            db.execute("INSERT INTO t VALUES (?)", (i,))  # one committed transaction each
        assert db.execute("SELECT count(*) FROM t").fetchone() == (50,)
    finally:
        mount.power_loss()  # the connection dies with the "machine"
    mount.start()
    try:
        db = sqlite3.connect(tmp_path / "mnt" / "t.db")
        (count,) = db.execute("SELECT count(*) FROM t").fetchone()
        db.close()
    finally:
        mount.stop()
    assert (count == 50) is survives, count

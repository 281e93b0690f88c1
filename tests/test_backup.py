"""Backup and restore of a whole mesh (issue #22), against real servers.

- Under steady publishing with webhook deliveries in flight: ``mesh backup create``,
  kill -9 everything, delete MESH_HOME, ``mesh restore``, ``mesh up``: every event
  published before the backup is in the stream and the tables and reaches the
  receiver at least once.
- A damaged archive (a flipped byte, a truncated file, a wrong passphrase) is
  refused with one line and the target home is left as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import Target, TargetKind
from tests.support import eventually, migrated_store
from tests.support.cli import MESH, ok, one_line_error
from tests.support.inproc import mesh_inproc as mesh
from tests.support.receiver import Receiver, Reply

PASSPHRASE = "correct horse battery staple"


def up_env(home: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    passfile = tmp_path / "passphrase"
    passfile.write_text(PASSPHRASE + "\n")
    env.update(
        {
            "MESH_HOME": str(home),
            "MESH_NATS_PORT": str(free_port()),
            "MESH_HTTP_PORT": str(free_port()),
            "MESH_BRIDGE_PORT": str(free_port()),
            "MESH_ALLOW_PRIVATE_TARGETS": "1",
            "MESH_CONFIG": str(tmp_path / "no-mesh.toml"),
            "MESH_QUIET": "1",
            "MESH_ACK_WAIT_MIN_S": "2",
            "MESH_BACKUP_PASSPHRASE_FILE": str(passfile),
            "MESH_LOG_FORMAT": "json",
        }
    )
    return env


async def start_up(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *MESH, "up", "--services", "sink,egress", env=env, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def ready() -> bool:
        if proc.returncode is not None:
            tail = (await asyncio.to_thread(log.read_text))[-2000:]
            raise AssertionError(f"mesh up exited: {tail}")
        return (await mesh(env, "status", "--json")).returncode == 0

    await eventually(ready, timeout=60, interval=0.5, what="mesh up")
    return proc


def kill_9(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the process and every child (its embedded nats-server): no clean stop."""
    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=10)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    # Slow answers keep deliveries in flight while the backup runs.
    async with Receiver(default=Reply(200, delay=0.2)) as rx:
        yield rx


def table_ids(home: Path) -> set[str]:
    conn = sqlite3.connect(home / "mesh.db")
    try:
        return {r[0] for r in conn.execute("SELECT id FROM events")}
    finally:
        conn.close()


async def stream_ids(settings: Settings) -> set[str]:
    async with MeshClient(settings, name="test-scan") as c:
        return {
            (m.headers or {}).get("ce-id", "")
            async for m in c.port.scan(c.names.events, [c.subjects.evt_all])
        }


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_backup_kill_restore_up_loses_nothing(tmp_path: Path, receiver: Receiver) -> None:
    home = tmp_path / "home"
    env = up_env(home, tmp_path)
    settings = Settings(home=home, nats_port=int(env["MESH_NATS_PORT"]))
    archives = tmp_path / "archives"
    proc = await start_up(env, tmp_path / "up1.log")
    published: list[str] = []
    before: set[str] = set()
    stop = asyncio.Event()
    try:
        ok(await mesh(env, "target", "add", "hook", "--webhook", receiver.url, "--timeout", "2"))
        ok(await mesh(env, "propagate", "unidirectional", "--source", "shop", "--target", "hook"))

        async def publish_steadily() -> None:
            async with MeshClient(settings, name="test-publisher") as c:
                n = 0
                while not stop.is_set():
                    published.append(await c.publish("shop", "order.placed", {"n": n}))
                    n += 1
                    await asyncio.sleep(0.01)

        publisher = asyncio.create_task(publish_steadily())
        await eventually(lambda: len(published) >= 150, timeout=60, what="150 publishes")
        await eventually(lambda: len(receiver.unique_ids()) >= 20, timeout=60, what="deliveries")
        before = set(published)  # acked by the stream before the backup starts
        made = ok(await mesh(env, "backup", "create", "--to", str(archives), "--json"))
        await asyncio.sleep(0.5)  # more events after the backup: these may be lost
        stop.set()
        await publisher
    finally:
        stop.set()
        kill_9(proc)
    doc = json.loads(made.stdout)
    archive = Path(doc["archive"])
    assert (await asyncio.to_thread(archive.stat)).st_mode & 0o077 == 0
    delivered_before_kill = set(receiver.unique_ids())
    in_archive = doc["streams"]["MESH_EVENTS"]
    shutil.rmtree(home)
    restored = ok(await mesh(env, "restore", str(archive), "--json"))
    assert json.loads(restored.stdout)["streams"]["MESH_EVENTS"] == in_archive
    assert (home / "keys" / "encryption.key").stat().st_mode & 0o077 == 0
    proc = await start_up(env, tmp_path / "up2.log")
    try:
        got = await stream_ids(settings)
        assert before <= got, f"{len(before - got)} events published before the backup missing"

        def all_delivered() -> bool:
            return before <= receiver.unique_ids()

        await eventually(all_delivered, timeout=90, interval=0.5, what="every event delivered")
        await eventually(lambda: before <= table_ids(home), timeout=60, what="every event in a row")
    finally:
        kill_9(proc)
    delivered = receiver.unique_ids()
    redelivered = len([i for i in before if len(receiver.for_id(i)) > 1])
    print(
        f"\npublished {len(published)}, acked before the backup {len(before)},"
        f" in the archive {in_archive}, in the restored stream {len(got)};"
        f" delivered before the kill {len(delivered_before_kill & before)},"
        f" after the restore every one of the {len(before)} ({redelivered} more than once);"
        f" delivered overall {len(delivered)}, missing {len(before - delivered)}"
    )
    assert not before - delivered


# Damaged archives ------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its content (dirs as '-')."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "-"
    return out


@pytest.fixture
async def archive(tmp_path: Path) -> AsyncIterator[tuple[Path, dict[str, str]]]:
    """A real backup of a small mesh (embedded broker store, SQLite), and its env."""
    home = tmp_path / "src"
    env = up_env(home, tmp_path)
    settings = Settings(home=home, nats_port=int(env["MESH_NATS_PORT"]))
    broker = EmbeddedBroker(settings.nats_store_dir, port=settings.nats_port)
    broker.start()
    try:
        async with MeshClient(settings, name="test") as c:
            await c.init()
            await c.add_target(Target(name="t1", kind=TargetKind.NATS))
            for n in range(20):
                await c.publish("app", "x", n)
        async with migrated_store(settings.db_url):
            pass
        # An API key: its bucket (KV_MESH_APIKEYS) comes along without being named.
        ok(await mesh(env, "apikey", "create", "--name", "ci", "--scope", "read"))
        made = ok(await mesh(env, "backup", "create", "--to", str(tmp_path / "out"), "--json"))
    finally:
        broker.stop()
    yield Path(json.loads(made.stdout)["archive"]), env


async def mesh_with_broker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``mesh ARGS`` against the restored home, with its nats-server running."""
    home = Path(env["MESH_HOME"])
    broker = EmbeddedBroker(home / "nats", port=int(env["MESH_NATS_PORT"]))
    await broker.astart()
    try:
        return await mesh(env, *args)
    finally:
        await broker.astop()


def flip_byte(src: Path, dst: Path) -> None:
    """A copy of ``src`` with one byte flipped inside the events stream's snapshot."""
    with tarfile.open(src) as tar:
        info = tar.getmember("streams/MESH_EVENTS.snap")
    data = bytearray(src.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0x01
    dst.write_bytes(data)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_damaged_archives_are_refused_and_the_home_is_untouched(
    tmp_path: Path, archive: tuple[Path, dict[str, str]]
) -> None:
    good, _ = archive
    flipped = tmp_path / "flipped.tar"
    flip_byte(good, flipped)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    not_tar = tmp_path / "notes.tar"
    not_tar.write_text("just some text\n")
    wrong = tmp_path / "wrong-passphrase"
    wrong.write_text("not the passphrase at all\n")

    target = tmp_path / "target"
    (tmp_path / "t").mkdir()
    env = up_env(target, tmp_path / "t")
    target.mkdir()
    (target / "notes.txt").write_text("an operator's file\n")
    before = tree_digest(target)
    cases = [
        ([str(flipped)], "does not match its checksum"),
        ([str(truncated)], "truncated"),
        ([str(not_tar)], "refused"),
        ([str(good), "--passphrase-file", str(wrong)], "wrong passphrase"),
        ([str(tmp_path / "missing.tar")], "no archive"),
    ]
    results = await asyncio.gather(*(mesh(env, "restore", *args) for args, _ in cases))
    for (args, needle), p in zip(cases, results, strict=True):
        one_line_error(p, needle)
        assert tree_digest(target) == before, args
    verify = await mesh(env, "backup", "verify", str(flipped))
    one_line_error(verify, "does not match its checksum")
    # list: the archive with its counts; a truncated one beside it, with its problem.
    cut = good.parent / good.name.replace("mesh-backup-", "mesh-backup-0")
    cut.write_bytes(truncated.read_bytes())
    listed = json.loads(
        ok(await mesh(env, "backup", "list", "--dir", str(good.parent), "--json")).stdout
    )
    by_name = {r["archive"]: r for r in listed}
    assert by_name[good.name]["messages"] >= 20 and by_name[good.name]["problem"] is None
    assert "truncated" in by_name[cut.name]["problem"]
    # The good archive with the right passphrase verifies and restores.
    ok(await mesh(env, "backup", "verify", str(good)))
    first = ok(await mesh(env, "restore", str(good), "--json"))
    # Restoring again over what is now a mesh is refused: keys exist.
    one_line_error(await mesh(env, "restore", str(good)), "exists", "--force")
    # --force replaces it: streams deleted and restored, rows replaced, keys rewritten.
    again = json.loads(ok(await mesh(env, "restore", str(good), "--force", "--json")).stdout)
    assert again["streams"]["MESH_EVENTS"] == 20
    assert again["tables"] == json.loads(first.stdout)["tables"]
    assert json.loads(first.stdout)["streams"]["KV_MESH_APIKEYS"] == 1
    keys = json.loads(ok(await mesh_with_broker(env, "apikey", "list", "--json")).stdout)
    assert [k["name"] for k in keys] == ["ci"]
    # The restored home seals its next backups to the archive's backup key, with no
    # passphrase given; the original passphrase opens them.
    no_pass = {k: v for k, v in env.items() if k != "MESH_BACKUP_PASSPHRASE_FILE"}
    made = ok(await mesh_with_broker(no_pass, "backup", "create", "--to", str(tmp_path / "y")))
    assert "backup" in made.stdout
    (later,) = (tmp_path / "y").glob("mesh-backup-*.tar")
    ok(await mesh(env, "backup", "verify", str(later)))
    # Without the passphrase (a server holding only the backup key): all but the keys.
    unopened = ok(await mesh(no_pass, "backup", "verify", str(later)))
    assert "not opened (no passphrase given)" in unopened.stdout, unopened.stdout
    one_line_error(await mesh(no_pass, "backup", "verify", str(flipped)), "checksum")
    one_line_error(
        await mesh(env, "backup", "verify", str(later), "--passphrase-file", str(wrong)),
        "wrong passphrase",
    )
    # No passphrase and no backup key: keys are never written unsealed.
    (tmp_path / "e").mkdir()
    empty = {**up_env(tmp_path / "empty", tmp_path / "e")}
    del empty["MESH_BACKUP_PASSPHRASE_FILE"]
    one_line_error(await mesh(empty, "backup", "create", "--to", str(tmp_path / "x")), "unsealed")

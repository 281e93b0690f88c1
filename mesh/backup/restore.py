"""``mesh backup verify`` and ``mesh restore``.

A restore checks the whole archive first (every member's checksum, the table
counts, the sealed keys against the passphrase) and the target (an empty home,
database and broker, unless ``--force``), and only then changes anything: a bad
archive or a wrong passphrase leaves the target as it was. Then streams (with their
consumers, so each target's feed resumes at its ack floor), tables, and the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mesh.backup import jetstream, tables
from mesh.backup import recipient as backup_key
from mesh.backup.archive import KEYS, SQLITE_MEMBER, ArchiveError, ArchiveReader
from mesh.backup.create import broker_connection
from mesh.backup.seal import write_key_dir
from mesh.config import Settings
from mesh.errors import Conflict, MeshError, StorageError
from mesh.storage import open_store
from mesh.storage._common import load_migrations

#: The SQLite member as extracted for checking, in the scratch directory (and what a
#: restore then loads from or moves into place).
SCRATCH_COPY = "mesh.sqlite"

#: Progress callback: (label, done, total).
Progress = Callable[[str, int, int], None]


@dataclass
class Verified:
    manifest: dict[str, Any]
    keys: dict[str, bytes]
    bytes_checked: int
    table_rows: dict[str, int] = field(default_factory=dict)
    sealed_to: backup_key.Recipient | None = None  # None: the older passphrase format
    keys_opened: bool = True  # False: verified without the passphrase

    def doc(self, path: Path | str) -> dict[str, Any]:
        m = self.manifest
        sealed = f"x25519:{self.sealed_to.fingerprint}" if self.sealed_to else "passphrase"
        return {
            "archive": str(path),
            "id": m["id"],
            "created": m["created"],
            "mesh_version": m["mesh_version"],
            "nats_server_version": m["nats_server_version"],
            "source": m["source"],
            "streams": {k: v["messages"] for k, v in m["streams"].items()},
            "tables": self.table_rows,
            "keys": sorted(self.keys) if self.keys_opened else m["keys"]["files"],
            "keys_opened": self.keys_opened,
            "sealed_to": sealed,
            "bytes_checked": self.bytes_checked,
        }


def _refused(reader: ArchiveReader, why: str) -> ArchiveError:
    return ArchiveError(f"archive {reader.path.name} is refused: {why}")


def _count_rows(reader: ArchiveReader, scratch: Path) -> dict[str, int]:
    """Each table's rows as the archive holds them (a SQLite copy is extracted to
    ``scratch``, where a restore then reads it)."""
    m = reader.manifest
    if m.get("table_format") == "sqlite":
        if SQLITE_MEMBER not in m.get("files", {}):
            return {}
        copy = scratch / SCRATCH_COPY
        with reader.open(SQLITE_MEMBER) as src, copy.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
        try:
            conn = tables.open_copy(copy)
            try:
                if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise _refused(reader, "the database in it fails SQLite's quick_check")
                return tables.count_sqlite(conn)
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            raise _refused(reader, f"the database in it does not open ({exc})") from None
    rows: dict[str, int] = {}
    for table in m.get("tables", {}):
        with reader.open(f"tables/{table}.msgpack") as f:
            try:
                _name, _cols, it = tables.read_table(f)
                rows[table] = sum(1 for _ in it)
            except (ValueError, StorageError) as exc:
                raise _refused(reader, f"table {table}: {exc}") from None
    return rows


def _verify(
    reader: ArchiveReader, passphrase: bytes | None, progress: Progress | None, scratch: Path
) -> Verified:
    m = reader.manifest
    done = reader.check_files((lambda d, t: progress("checksums", d, t)) if progress else None)
    rows = _count_rows(reader, scratch)
    for table, want in m.get("tables", {}).items():
        if rows.get(table) != want:
            raise _refused(reader, f"table {table} has {rows.get(table)} rows, not {want}")
    for stream in m.get("streams", {}):
        reader.open(f"streams/{stream}.snap").close()
    sealed = reader.read(KEYS)
    sealed_to = backup_key.recipient_of(sealed)
    if passphrase is None:  # everything but opening the keys (a server without it)
        return Verified(m, {}, done, rows, sealed_to, keys_opened=False)
    keys = backup_key.open_keys(sealed, passphrase, m["id"])
    return Verified(m, keys, done, rows, sealed_to)


def verify_archive(
    path: Path, passphrase: bytes | None, progress: Progress | None = None
) -> Verified:
    """Checksums, row counts and (given the passphrase) that the keys open."""
    with ArchiveReader(path) as reader, tempfile.TemporaryDirectory(prefix="mesh-verify-") as tmp:
        return _verify(reader, passphrase, progress, Path(tmp))


@dataclass
class RestoreResult:
    verified: Verified
    streams: dict[str, int]
    tables: dict[str, int]
    seconds: float

    def doc(self, path: Path | str) -> dict[str, Any]:
        return {
            "archive": str(path),
            "streams": self.streams,
            "tables": self.tables,
            "keys": sorted(self.verified.keys),
            "seconds": round(self.seconds, 3),
        }


def _check_schema(manifest: dict[str, Any], backend: str) -> None:
    have = max((mg.version for mg in load_migrations(backend)), default=0)
    want = max(manifest.get("schema_migrations") or [0])
    if want > have:
        raise Conflict(
            f"the archive's schema is version {want}, newer than this mesh ({have}): upgrade mesh"
        )


async def _check_database(settings: Settings, names: list[str], force: bool) -> None:
    url = settings.db_url
    if tables.backend(url) == "sqlite":
        path = Path(tables.sqlite_file(url))
        if not await asyncio.to_thread(path.exists):
            return  # nothing there, and a look must not create the file
    store = await open_store(url)
    try:
        if not await store.applied_migrations():
            return
        for table in names:
            try:
                n = await store.count(table)
            except MeshError:  # a table this build does not know: the load checks it
                continue
            if n and not force:
                raise Conflict(
                    f"the database already holds {n} rows in {table}: restore into an empty"
                    " database, or --force replaces them"
                )
    finally:
        await store.close()


async def restore_archive(
    settings: Settings,
    path: Path,
    passphrase: bytes,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    started = time.monotonic()
    reader = await asyncio.to_thread(ArchiveReader, path)
    scratch = tempfile.TemporaryDirectory(prefix="mesh-restore-")
    try:
        verified = await asyncio.to_thread(
            _verify, reader, passphrase, progress, Path(scratch.name)
        )
        m = verified.manifest
        backend = tables.backend(settings.db_url)
        _check_schema(m, backend)
        key_dir = settings.key_path.parent
        present = [n for n in verified.keys if (key_dir / n).exists()]
        if present and not force:
            raise Conflict(
                f"{key_dir / present[0]} exists: restore into an empty MESH_HOME,"
                " or --force replaces its keys"
            )
        await _check_database(settings, list(m.get("tables", {})), force)
        restored: dict[str, int] = {}
        async with broker_connection(settings, live_ok=force, restoring=True) as nc:
            js = nc.jetstream()
            existing = await jetstream.mesh_streams(js, settings.prefix)
            clash = [n for n in m["streams"] if n in existing]
            if clash and not force:
                raise Conflict(
                    f"the broker already has {', '.join(clash)}: restore into an empty broker,"
                    " or --force replaces them"
                )
            for name in existing if force else []:
                await jetstream.delete_stream(nc, name)
            # Into no database at all, the verified SQLite copy becomes the database:
            # moved into place beside the streams' restore (the server's work), renamed
            # once they are in. Else the rows are loaded after them (_load_tables).
            staging = _stage(settings, m, Path(scratch.name))
            try:
                await _restore_streams(settings, nc, reader, m, restored, progress)
            except BaseException:
                # A stream that failed half-way (and those before it) go: the broker is
                # left as it was found, and the same restore can run again.
                for name in m["streams"]:
                    with contextlib.suppress(Exception):
                        await jetstream.delete_stream(nc, name)
                if staging is not None:
                    with contextlib.suppress(Exception):
                        (await staging).unlink(missing_ok=True)
                raise
        if staging is not None:
            staged = await staging
            await asyncio.to_thread(tables.commit_copy, staged, tables.sqlite_file(settings.db_url))
            counts = dict(verified.table_rows)
        store = await open_store(settings.db_url)
        try:
            await store.migrate()
        finally:
            await store.close()
        if staging is None:
            counts = await _load_tables(settings, reader, Path(scratch.name), force)
        await asyncio.to_thread(write_key_dir, key_dir, verified.keys)
        if verified.sealed_to is not None and (force or backup_key.load(settings.home) is None):
            # The restored mesh's next backups seal to the key this archive was sealed
            # to: the passphrase that opened it opens them.
            await asyncio.to_thread(backup_key.save, settings.home, verified.sealed_to)
    finally:
        reader.close()
        scratch.cleanup()
    return RestoreResult(verified, restored, counts, time.monotonic() - started)


async def _restore_streams(
    settings: Settings,
    nc: Any,
    reader: ArchiveReader,
    m: dict[str, Any],
    restored: dict[str, int],
    progress: Progress | None,
) -> None:
    js = nc.jetstream()
    for name, info in m["streams"].items():
        meta = json.loads(reader.read(f"streams/{name}.json"))
        total = int(m["files"][f"streams/{name}.snap"]["size"])

        def step(done: int, label: str = name, total: int = total) -> None:
            if progress:
                progress(f"stream {label}", done, total)

        with reader.open(f"streams/{name}.snap") as f:
            await jetstream.restore(nc, meta, f, replicas=settings.stream_replicas, progress=step)
        got = await js.stream_info(name)
        if got.state.messages != info["messages"]:
            raise StorageError(
                f"stream {name} restored with {got.state.messages} messages,"
                f" the archive has {info['messages']}"
            )
        restored[name] = got.state.messages


def _stage(settings: Settings, m: dict[str, Any], scratch: Path) -> asyncio.Future[Path] | None:
    """The SQLite copy on its way into place, when the target has no database yet."""
    copy = scratch / SCRATCH_COPY
    url = settings.db_url
    if m.get("table_format") != "sqlite" or tables.backend(url) != "sqlite":
        return None
    path = tables.sqlite_file(url)
    if not copy.exists() or not tables.fresh_sqlite(path):
        return None
    return asyncio.ensure_future(asyncio.to_thread(tables.stage_copy, path, copy))


async def _load_tables(
    settings: Settings, reader: ArchiveReader, scratch: Path, force: bool
) -> dict[str, int]:
    m = reader.manifest
    url = settings.db_url
    to_sqlite = tables.backend(url) == "sqlite"
    if m.get("table_format") == "sqlite":
        copy = scratch / SCRATCH_COPY
        if not copy.exists():
            return {}
        if to_sqlite:
            return await asyncio.to_thread(
                tables.attach_copy, tables.sqlite_file(url), copy, force=force
            )
        return await tables.load_postgres(url, tables.sqlite_sources(copy), force=force)
    sources = [tables.msgpack_source(_member(reader, t)) for t in m.get("tables", {})]
    if to_sqlite:
        return await asyncio.to_thread(
            tables.load_sqlite, tables.sqlite_file(url), sources, force=force
        )
    return await tables.load_postgres(url, sources, force=force)


def _member(reader: ArchiveReader, table: str) -> Callable[[], IO[bytes]]:
    return lambda: reader.open(f"tables/{table}.msgpack")

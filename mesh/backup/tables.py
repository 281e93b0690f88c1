"""The SQL tables in and out of an archive, in one portable form.

A table travels as a msgpack stream: a header ``{"table", "columns"}``, then one
list per row, values as SQLite holds them (times as ISO 8601 text in UTC, JSON as
text, booleans as 0/1, bytes as bytes). So an archive from SQLite restores onto
PostgreSQL and back.

Consistency: SQLite is copied with its online backup API into a scratch file
(one consistent picture while the sink keeps writing), and the rows are read from
that copy. PostgreSQL is read inside one ``REPEATABLE READ READ ONLY`` transaction:
every table as of the same snapshot, through a server-side cursor (rows, not
``COPY`` text, so that the values are typed and portable).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import asyncpg
import msgpack

from mesh.errors import StorageError
from mesh.storage import backend_of, sqlite_path

SKIP = {"schema_migrations"}
BATCH = 2000

#: Called with (table, rows so far).
Progress = Callable[[str, int], None]
#: Opens the member file for a table (a writer for dumps).
Opener = Callable[[str], IO[bytes]]


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _neutral(value: Any) -> Any:
    if isinstance(value, datetime):
        return _ts(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


# Dump -------------------------------------------------------------------------------


def _write_table(
    out: IO[bytes],
    table: str,
    columns: list[str],
    rows: Iterator[list[Any]],
    progress: Progress | None,
) -> int:
    packer = msgpack.Packer(use_bin_type=True)
    out.write(packer.pack({"table": table, "columns": columns}))
    n = 0
    for row in rows:
        out.write(packer.pack(row))
        n += 1
        if progress and n % BATCH == 0:
            progress(table, n)
    return n


def _sqlite_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name"
    ).fetchall()
    return [r[0] for r in rows if r[0] not in SKIP]


def _migrations_sqlite(conn: sqlite3.Connection) -> list[int]:
    try:
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    except sqlite3.OperationalError:
        return []


def dump_sqlite(
    path: str, copy: Path, progress: Progress | None = None
) -> tuple[dict[str, int], list[int]]:
    """Copy the database to ``copy`` with the online backup API; its row counts.

    The copy is the archive's member as it is (pages, not rows: as fast as the disk),
    ``VACUUM``-free; a restore onto PostgreSQL reads its rows (``sqlite_sources``).
    """
    if not Path(path).exists():
        return {}, []
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    dst = sqlite3.connect(copy)
    try:
        src.execute("PRAGMA busy_timeout=10000")
        # A scratch copy, hashed into the archive that is fsynced whole at its end: no
        # rollback journal and no fsync of its own (half the writes, none waited for).
        dst.execute("PRAGMA journal_mode=OFF")
        dst.execute("PRAGMA synchronous=OFF")
        src.backup(dst, pages=-1)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal
        return count_sqlite(dst), _migrations_sqlite(dst)
    finally:
        src.close()
        dst.close()


def count_sqlite(conn: sqlite3.Connection) -> dict[str, int]:
    return {
        t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in _sqlite_tables(conn)
    }


def open_copy(path: Path) -> sqlite3.Connection:
    """A database file taken from an archive, read-only."""
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)


async def dump_postgres(
    url: str, open_member: Opener, progress: Progress | None = None
) -> tuple[dict[str, int], list[int]]:
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageError(f"cannot connect to the database: {exc}") from None
    counts: dict[str, int] = {}
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            names = await conn.fetch(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
                " ORDER BY table_name"
            )
            migrations: list[int] = []
            if any(r[0] == "schema_migrations" for r in names):
                migrations = [
                    r[0]
                    for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
                ]
            for (table,) in names:
                if table in SKIP:
                    continue
                cols = await conn.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema"
                    " = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                    table,
                )
                columns = [c[0] for c in cols]
                select = ", ".join(f'"{c}"' for c in columns)
                packer = msgpack.Packer(use_bin_type=True)
                n = 0
                with open_member(table) as out:
                    out.write(packer.pack({"table": table, "columns": columns}))
                    async for record in conn.cursor(
                        f'SELECT {select} FROM "{table}"',
                        prefetch=BATCH,
                    ):
                        out.write(packer.pack([_neutral(v) for v in record.values()]))
                        n += 1
                        if progress and n % BATCH == 0:
                            progress(table, n)
                counts[table] = n
    finally:
        await conn.close()
    return counts, migrations


# Load -------------------------------------------------------------------------------


#: One table: its name, its columns, its rows.
TableData = tuple[str, list[str], Iterator[list[Any]]]
#: Opens one table's rows for a restore.
Source = Callable[[], AbstractContextManager[TableData]]


def read_table(f: IO[bytes]) -> TableData:
    unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=64 * 1024 * 1024)
    try:
        header = next(unpacker)
        table, columns = header["table"], list(header["columns"])
    except (StopIteration, KeyError, TypeError, ValueError):
        raise StorageError("a table in the archive has no header") from None
    return table, columns, (list(r) for r in unpacker)


def msgpack_source(open_member: Callable[[], IO[bytes]]) -> Source:
    @contextmanager
    def source() -> Iterator[TableData]:
        with open_member() as f:
            yield read_table(f)

    return source


def sqlite_sources(path: Path) -> list[Source]:
    """The tables of a database file from an archive, as row sources."""
    conn = open_copy(path)
    try:
        names = _sqlite_tables(conn)
    finally:
        conn.close()

    def one(table: str) -> Source:
        @contextmanager
        def source() -> Iterator[TableData]:
            c = open_copy(path)
            try:
                cur = c.execute(f'SELECT * FROM "{table}"')
                yield table, [d[0] for d in cur.description], (list(r) for r in cur)
            finally:
                c.close()

        return source

    return [one(t) for t in names]


def fresh_sqlite(path: str) -> bool:
    """No database file (nor its WAL) at ``path``: a restore may put the copy there whole."""
    return not any(Path(path + end).exists() for end in ("", "-wal", "-journal"))


def stage_copy(path: str, copy: Path) -> Path:
    """The verified copy moved beside the database's place (a rename on one filesystem,
    else a copy) and fsynced; ``commit_copy`` puts it in place (a caller that gives up
    unlinks it)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.restoring")
    staged.unlink(missing_ok=True)
    try:
        shutil.move(copy, staged)
        with staged.open("rb+") as f:
            os.fsync(f.fileno())
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise StorageError(f"cannot restore the tables into {path}: {exc}") from None
    return staged


def commit_copy(staged: Path, path: str) -> None:
    target = Path(path)
    os.replace(staged, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def attach_copy(path: str, copy: Path, *, force: bool) -> dict[str, int]:
    """SQLite onto SQLite: ``INSERT .. SELECT`` from the attached copy, in C, one
    transaction; columns the target has and the copy lacks keep their defaults."""
    conn = sqlite3.connect(path, isolation_level=None)
    counts: dict[str, int] = {}
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("ATTACH DATABASE ? AS archived", (f"file:{copy}?mode=ro",))
        conn.execute("BEGIN IMMEDIATE")
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM archived.sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
            if r[0] not in SKIP
        ]
        for table in tables:
            _check_empty_sqlite(conn, table, force)
            cols = [r[1] for r in conn.execute(f'PRAGMA archived.table_info("{table}")')]
            have = {r[1] for r in conn.execute(f'PRAGMA main.table_info("{table}")')}
            missing = [c for c in cols if c not in have]
            if missing:
                raise StorageError(f"table {table} has no column {missing[0]} here")
            names = ", ".join(f'"{c}"' for c in cols)
            cur = conn.execute(
                f'INSERT INTO main."{table}" ({names}) SELECT {names} FROM archived."{table}"'
            )
            counts[table] = cur.rowcount
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE archived")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot restore the tables into {path}: {exc}") from None
    finally:
        conn.close()
    return counts


def _batches(rows: Iterator[list[Any]], n: int = BATCH) -> Iterator[list[list[Any]]]:
    buf: list[list[Any]] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def load_sqlite(path: str, sources: list[Source], *, force: bool) -> dict[str, int]:
    conn = sqlite3.connect(path, isolation_level=None)
    counts: dict[str, int] = {}
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("BEGIN IMMEDIATE")
        for source in sources:
            with source() as (table, columns, rows):
                _check_empty_sqlite(conn, table, force)
                cols = ", ".join(f'"{c}"' for c in columns)
                marks = ", ".join("?" * len(columns))
                sql = f'INSERT INTO "{table}" ({cols}) VALUES ({marks})'
                n = 0
                for batch in _batches(rows):
                    conn.executemany(sql, batch)
                    n += len(batch)
                counts[table] = n
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot restore the tables into {path}: {exc}") from None
    finally:
        conn.close()
    return counts


def _check_empty_sqlite(conn: sqlite3.Connection, table: str, force: bool) -> None:
    if force:
        conn.execute(f'DELETE FROM "{table}"')
        return
    if conn.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchone():
        raise StorageError(
            f"table {table} is not empty: restore into an empty database, or --force"
        )


def _pg_converter(data_type: str) -> Callable[[Any], Any]:
    if data_type.startswith("timestamp"):
        return lambda v: None if v is None else datetime.fromisoformat(v)
    if data_type == "boolean":
        return lambda v: None if v is None else bool(v)
    return lambda v: v


async def load_postgres(url: str, sources: list[Source], *, force: bool) -> dict[str, int]:
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageError(f"cannot connect to the database: {exc}") from None
    counts: dict[str, int] = {}
    try:
        async with conn.transaction():
            for source in sources:
                with source() as (table, columns, rows):
                    info = await conn.fetch(
                        "SELECT column_name, data_type, is_identity FROM information_schema.columns"
                        " WHERE table_schema = current_schema() AND table_name = $1",
                        table,
                    )
                    types = {r[0]: r[1] for r in info}
                    missing = [c for c in columns if c not in types]
                    if missing:
                        raise StorageError(f"table {table} has no column {missing[0]} here")
                    if force:
                        await conn.execute(f'DELETE FROM "{table}"')
                    elif await conn.fetchval(f'SELECT 1 FROM "{table}" LIMIT 1'):
                        raise StorageError(
                            f"table {table} is not empty: restore into an empty database,"
                            " or --force"
                        )
                    conv = [_pg_converter(types[c]) for c in columns]
                    n = 0
                    for batch in _batches(rows):
                        records = [
                            tuple(cv(v) for cv, v in zip(conv, r, strict=True)) for r in batch
                        ]
                        await conn.copy_records_to_table(table, records=records, columns=columns)
                        n += len(batch)
                    counts[table] = n
                    for col in (r[0] for r in info if r[2] == "YES"):
                        await conn.execute(
                            f"SELECT setval(pg_get_serial_sequence('\"{table}\"', '{col}'),"
                            f' GREATEST(COALESCE(MAX("{col}"), 0), 1), MAX("{col}") IS NOT NULL)'
                            f' FROM "{table}"'
                        )
    except asyncpg.PostgresError as exc:
        raise StorageError(f"cannot restore the tables: {exc}") from None
    finally:
        await conn.close()
    return counts


def backend(url: str) -> str:
    return backend_of(url)


def sqlite_file(url: str) -> str:
    return sqlite_path(url)

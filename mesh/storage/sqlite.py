"""SQLite backend: aiosqlite, WAL, one writer connection.

Writes go through a single connection under an asyncio lock, each in a
``BEGIN IMMEDIATE`` transaction: it takes the write lock up front, so a second
process waits out ``busy_timeout`` instead of failing to upgrade a read lock.
Reads use a second connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from mesh.errors import StorageError
from mesh.storage import _registry as reg
from mesh.storage._common import (
    RowsRefused,
    check_limit,
    check_table,
    dump_json,
    first_line,
    load_migrations,
    to_utc,
    type_regex,
)
from mesh.storage._rows import (
    AUDIT,
    BATCH_SPECS,
    DEAD_LETTERS,
    DELIVERIES,
    EVENTS,
    PROPAGATIONS,
    SERVICES,
    RowSpec,
)
from mesh.storage.models import (
    AuditRow,
    DeadLetterRow,
    DeliveryRow,
    EventRow,
    HealthCheckRow,
    PropagationRow,
    ServiceRow,
    Table,
    WriteResult,
    utcnow,
)

DEFAULT_BUSY_TIMEOUT_MS = 10_000
# Bound parameters per statement: SQLITE_MAX_VARIABLE_NUMBER's default (999 before 3.32).
_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL
)
"""


def _ts(value: datetime) -> str:
    # Fixed-width UTC text: lexical order is time order.
    return to_utc(value).isoformat(timespec="microseconds")


def _dt(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _regexp(pattern: str, value: str | None) -> bool:
    return value is not None and re.search(pattern, value) is not None


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def split_statements(script: str) -> Iterator[str]:
    """The statements of a migration file; a trailing comment is dropped."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""


class SqliteStore:
    """A ``Store`` on one SQLite file (or ``:memory:``)."""

    backend = "sqlite"

    def __init__(self, path: str, url: str, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.url = url
        self._busy_timeout_ms = busy_timeout_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # aiosqlite serialises calls, not transactions: the lock keeps one
        # coroutine's BEGIN..COMMIT from interleaving with another's.
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._file_id: tuple[int, int] | None = None

    @classmethod
    async def open(cls, path: str, url: str, **options: Any) -> SqliteStore:
        store = cls(path, url, **options)
        try:
            await store._connect()
        except BaseException:
            await store.close()
            raise
        return store

    # Connections ----------------------------------------------------------

    async def _connect(self) -> None:
        memory = self.path == ":memory:"
        if not memory:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create the directory for {self.url}: {exc}") from None
        with self._errors("open"):
            self._writer = await self._open_connection()
            await self._writer.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the sink acks the messages it covers.
            await self._writer.execute("PRAGMA synchronous=FULL")
            if memory:
                # A second connection would open a second, empty database.
                self._reader = self._writer
            else:
                self._reader = await self._open_connection()
                await self._reader.execute("PRAGMA query_only=ON")
                self._file_id = self._stat()

    async def _open_connection(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            await conn.create_function("regexp", 2, _regexp, deterministic=True)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        reader, writer = self._reader, self._writer
        self._reader = self._writer = None
        for conn in (reader, writer) if reader is not writer else (writer,):
            if conn is not None:
                with suppress(sqlite3.Error, ValueError):
                    await conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError) as exc:
            raise RowsRefused(f"sqlite {action} refused ({self.path}): {first_line(exc)}") from exc
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"sqlite {action} failed ({self.path}): {first_line(exc)}") from exc

    def _conn(self, conn: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if conn is None:
            raise StorageError(f"store {self.url} is closed")
        return conn

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _check_file(self) -> None:
        # An open connection keeps working on a file that was deleted or replaced:
        # every write would then vanish. Refuse instead, so the caller reopens.
        if self._file_id is not None and self._stat() != self._file_id:
            raise StorageError(f"the database file {self.path} was removed or replaced")

    @asynccontextmanager
    async def _write(
        self, action: str, *, transaction: bool = True
    ) -> AsyncIterator[aiosqlite.Connection]:
        """The writer connection, in a ``BEGIN IMMEDIATE`` transaction unless the caller
        runs a single statement (which SQLite makes atomic by itself)."""
        async with self._write_lock:
            conn = self._conn(self._writer)
            self._check_file()
            with self._errors(action):
                if not transaction:
                    yield conn
                    return
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = self._conn(self._reader)
        with self._errors("query"):
            return list(await conn.execute_fetchall(sql, params))

    # Schema ---------------------------------------------------------------

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        for migration in load_migrations("sqlite"):
            async with self._write(f"migration {migration.version:04d}") as conn:
                await conn.execute(_BOOTSTRAP)
                found = await conn.execute_fetchall(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
                )
                if list(found):
                    continue
                for statement in split_statements(migration.sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, _ts(utcnow())),
                )
            applied.append(migration.version)
        return applied

    async def applied_migrations(self) -> list[int]:
        exists = await self._fetch(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        )
        if not exists:
            return []
        return [r[0] for r in await self._fetch("SELECT version FROM schema_migrations ORDER BY 1")]

    async def ping(self) -> None:
        self._check_file()
        await self._fetch("SELECT 1")

    # Sink writes ----------------------------------------------------------

    async def write_batch(
        self,
        events: Iterable[EventRow] = (),
        deliveries: Iterable[DeliveryRow] = (),
        dead_letters: Iterable[DeadLetterRow] = (),
        health_checks: Iterable[HealthCheckRow] = (),
    ) -> WriteResult:
        batches = [
            (spec, spec.prepare(rows, _ts))
            for spec, rows in zip(
                BATCH_SPECS, (events, deliveries, dead_letters, health_checks), strict=True
            )
        ]
        if not any(rows for _, rows in batches):
            return WriteResult()
        # Many rows per INSERT, not executemany: sqlite3 releases and retakes the GIL
        # around every statement step, and with a busy event loop each retake can
        # wait a whole switch interval. One statement needs no BEGIN/COMMIT either.
        statements: list[tuple[int, str, list[Any]]] = []
        for i, (spec, rows) in enumerate(batches):
            width = len(spec.fields)
            step = max(1, _MAX_VARIABLES // width)
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                values = ", ".join([f"({_marks(width)})"] * len(chunk))
                sql = f"INSERT INTO {spec.table} ({spec.columns}) VALUES {values}"
                statements.append(
                    (i, sql + " ON CONFLICT DO NOTHING", [v for r in chunk for v in r])
                )
        counts = [0, 0, 0, 0]
        async with self._write("write", transaction=len(statements) > 1) as conn:
            for i, sql, params in statements:
                cursor = await conn.execute(sql, params)
                counts[i] += max(cursor.rowcount, 0)
        return WriteResult(*counts)

    # Queries --------------------------------------------------------------

    async def query_events(
        self,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[EventRow]:
        where: list[str] = []
        params: list[Any] = []
        if source is not None:
            where.append("source = ?")
            params.append(source)
        if type is not None:
            regex = type_regex(type)
            where.append("type = ?" if regex is None else "type REGEXP ?")
            params.append(type if regex is None else regex)
        if since is not None:
            where.append("time >= ?")
            params.append(_ts(since))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(check_limit(limit))
        rows = await self._fetch(
            f"SELECT {EVENTS.columns} FROM events {clause}"
            " ORDER BY time DESC, stream_seq DESC, id LIMIT ?",
            params,
        )
        return [EVENTS.decode(r, _dt) for r in rows]

    async def get_event(self, id: str) -> EventRow | None:
        rows = await self._fetch(f"SELECT {EVENTS.columns} FROM events WHERE id = ?", (id,))
        return EVENTS.decode(rows[0], _dt) if rows else None

    async def query_deliveries(self, event_id: str) -> list[DeliveryRow]:
        rows = await self._fetch(
            f"SELECT {DELIVERIES.columns} FROM deliveries WHERE event_id = ?"
            " ORDER BY at, attempt, target, id",
            (event_id,),
        )
        return [DELIVERIES.decode(r, _dt) for r in rows]

    async def query_dead_letters(
        self, target: str | None = None, limit: int = 100
    ) -> list[DeadLetterRow]:
        rows = await self._fetch(
            f"SELECT {DEAD_LETTERS.columns} FROM dead_letters WHERE (? IS NULL OR target = ?)"
            " ORDER BY dead_at DESC, id LIMIT ?",
            (target, target, check_limit(limit)),
        )
        return [DEAD_LETTERS.decode(r, _dt) for r in rows]

    async def count(self, table: Table | str) -> int:
        rows = await self._fetch(f"SELECT count(*) FROM {check_table(table).value}")
        return int(rows[0][0])

    # Registry mirror and audit -------------------------------------------

    async def list_services(self) -> list[ServiceRow]:
        rows = await self._fetch(f"SELECT {SERVICES.columns} FROM services ORDER BY name")
        return [SERVICES.decode(r, _dt) for r in rows]

    async def upsert_service(
        self, service: ServiceRow, *, actor: str | None = None
    ) -> ServiceRow | None:
        return await self._upsert(SERVICES, service, actor)

    async def delete_service(self, name: str, *, actor: str | None = None) -> ServiceRow | None:
        return await self._delete(SERVICES, name, actor)

    async def list_propagations(self) -> list[PropagationRow]:
        rows = await self._fetch(f"SELECT {PROPAGATIONS.columns} FROM propagations ORDER BY id")
        return [PROPAGATIONS.decode(r, _dt) for r in rows]

    async def upsert_propagation(
        self, propagation: PropagationRow, *, actor: str | None = None
    ) -> PropagationRow | None:
        return await self._upsert(PROPAGATIONS, propagation, actor)

    async def delete_propagation(
        self, id: str, *, actor: str | None = None
    ) -> PropagationRow | None:
        return await self._delete(PROPAGATIONS, id, actor)

    async def _upsert(self, spec: RowSpec[reg.R], row: reg.R, actor: str | None) -> reg.R | None:
        key = spec.key[0]
        updates = ", ".join(
            f"{f} = excluded.{f}" for f in spec.fields if f not in (key, "created_at")
        )
        async with self._write(f"upsert {spec.table}") as conn:
            found = list(
                await conn.execute_fetchall(
                    f"SELECT {spec.columns} FROM {spec.table} WHERE {key} = ?",
                    (getattr(row, key),),
                )
            )
            before = spec.decode(found[0], _dt) if found else None
            if not reg.changed(before, row):
                return before
            await conn.execute(
                f"INSERT INTO {spec.table} ({spec.columns}) VALUES ({_marks(len(spec.fields))})"
                f" ON CONFLICT ({key}) DO UPDATE SET {updates}",
                spec.encode(row, _ts),
            )
            if actor is not None:
                await self._audit(conn, actor, *reg.audit_upsert(before, row))
        return before

    async def _delete(self, spec: RowSpec[reg.R], key: str, actor: str | None) -> reg.R | None:
        async with self._write(f"delete from {spec.table}") as conn:
            found = list(
                await conn.execute_fetchall(
                    f"DELETE FROM {spec.table} WHERE {spec.key[0]} = ? RETURNING {spec.columns}",
                    (key,),
                )
            )
            if not found:
                return None
            before = spec.decode(found[0], _dt)
            if actor is not None:
                await self._audit(conn, actor, *reg.audit_delete(before))
        return before

    async def append_audit(
        self, actor: str, action: str, entity: str, before: Any, after: Any
    ) -> int:
        async with self._write("audit") as conn:
            return await self._audit(conn, actor, action, entity, before, after)

    async def _audit(
        self,
        conn: aiosqlite.Connection,
        actor: str,
        action: str,
        entity: str,
        before: Any,
        after: Any,
    ) -> int:
        cursor = await conn.execute(
            "INSERT INTO audit_log (at, actor, action, entity, before, after)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                _ts(utcnow()),
                actor,
                action,
                entity,
                None if before is None else dump_json(before),
                None if after is None else dump_json(after),
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def query_audit(self, entity: str | None = None, limit: int = 100) -> list[AuditRow]:
        rows = await self._fetch(
            f"SELECT {AUDIT.columns} FROM audit_log WHERE (? IS NULL OR entity = ?)"
            " ORDER BY id DESC LIMIT ?",
            (entity, entity, check_limit(limit)),
        )
        return [AUDIT.decode(r, _dt) for r in rows]

    # Key rotation ---------------------------------------------------------

    async def iter_payloads(
        self, table: Table | str, after_id: str | None = None, batch_size: int = 500
    ) -> AsyncIterator[tuple[str, bytes]]:
        name = check_table(table, payload=True).value
        check_limit(batch_size)
        last = after_id
        while True:
            rows = await self._fetch(
                f"SELECT id, payload FROM {name} WHERE encrypted = 1"
                " AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?",
                (last, last, batch_size),
            )
            for r in rows:
                yield r[0], bytes(r[1])
            if len(rows) < batch_size:
                return
            last = rows[-1][0]

    async def update_payloads(self, table: Table | str, rows: Sequence[tuple[str, bytes]]) -> int:
        name = check_table(table, payload=True).value
        if not rows:
            return 0
        async with self._write("update payloads") as conn:
            cursor = await conn.executemany(
                f"UPDATE {name} SET payload = ? WHERE id = ?", [(p, i) for i, p in rows]
            )
            return max(cursor.rowcount, 0)

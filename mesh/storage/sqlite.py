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
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from mesh.errors import StorageError
from mesh.storage._common import RowsRefused, first_line, to_utc
from mesh.storage._sql import Batches, SqlStore
from mesh.storage.models import WriteResult

DEFAULT_BUSY_TIMEOUT_MS = 10_000
# Bound parameters per statement: SQLITE_MAX_VARIABLE_NUMBER's default (999 before 3.32).
_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


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


def check_file(path: Path) -> None:
    """Raise ``StorageError`` unless the database file exists and can be written."""
    if not path.is_file():
        raise StorageError(
            f"SQLite database {path} does not exist (the sink creates it; or `mesh init`)"
        )
    if not os.access(path.parent, os.W_OK | os.X_OK) or not os.access(path, os.W_OK):
        raise StorageError(f"SQLite database {path} is not writable")


class SqliteStore(SqlStore[aiosqlite.Connection]):
    """A ``Store`` on one SQLite file (or ``:memory:``)."""

    backend = "sqlite"
    _TIME_TYPE = "TEXT"
    _REGEXP = "REGEXP"
    _JSON_CAST = ""
    _ENCRYPTED = "encrypted = 1"
    _ID_ORDER = "id"

    def __init__(self, path: str, url: str, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        super().__init__(url)
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # aiosqlite serialises calls, not transactions: the lock keeps one
        # coroutine's BEGIN..COMMIT from interleaving with another's.
        self._write_lock = asyncio.Lock()
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

    # Dialect --------------------------------------------------------------

    @staticmethod
    def _mark(n: int) -> str:
        return "?"

    @staticmethod
    def _ts(value: datetime) -> str:
        # Fixed-width UTC text: lexical order is time order.
        return to_utc(value).isoformat(timespec="microseconds")

    @staticmethod
    def _dt(value: Any) -> datetime:
        return datetime.fromisoformat(value)

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

    async def _disconnect(self) -> None:
        reader, writer = self._reader, self._writer
        self._reader = self._writer = None
        for conn in (reader, writer) if reader is not writer else (writer,):
            if conn is not None:
                with suppress(sqlite3.Error, ValueError):
                    await conn.close()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError) as exc:
            raise RowsRefused(f"sqlite {action} refused ({self.path}): {first_line(exc)}") from exc
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"sqlite {action} failed ({self.path}): {first_line(exc)}") from exc

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
            conn = self._live(self._writer)
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

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        conn = self._live(self._reader)
        with self._errors("query"):
            return list(await conn.execute_fetchall(sql, args))

    async def _fetch_on(
        self, conn: aiosqlite.Connection, sql: str, *args: Any
    ) -> list[Sequence[Any]]:
        return list(await conn.execute_fetchall(sql, args))

    async def _execute_on(self, conn: aiosqlite.Connection, sql: str, *args: Any) -> None:
        await conn.execute(sql, args)

    # Schema ---------------------------------------------------------------

    async def _run_script(self, conn: aiosqlite.Connection, sql: str) -> None:
        for statement in split_statements(sql):
            await conn.execute(statement)

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

    async def check(self) -> None:
        if self.path != ":memory:":
            check_file(Path(self.path))
        await self.ping()

    async def durability_warnings(self) -> list[str]:
        conn = self._live(self._writer)
        with self._errors("query"):
            (mode,), *_ = await conn.execute_fetchall("PRAGMA journal_mode")
            (sync,), *_ = await conn.execute_fetchall("PRAGMA synchronous")
        warnings = []
        if self.path != ":memory:" and str(mode).lower() != "wal":
            warnings.append(f"SQLite journal_mode is {mode}, not wal")
        if int(sync) < 2:  # 0 OFF, 1 NORMAL: a WAL commit may be lost to a power failure
            warnings.append(f"SQLite synchronous is {sync}, not FULL (2)")
        return warnings

    # Writes ---------------------------------------------------------------

    async def _insert_batches(self, batches: Batches) -> WriteResult:
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

    async def _update_payloads(self, table: str, rows: Sequence[tuple[str, bytes]]) -> int:
        async with self._write("update payloads") as conn:
            cursor = await conn.executemany(
                f"UPDATE {table} SET payload = ? WHERE id = ?", [(p, i) for i, p in rows]
            )
            return max(cursor.rowcount, 0)

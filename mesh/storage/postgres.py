"""PostgreSQL backend: an asyncpg pool.

Batches are inserted with one ``INSERT .. SELECT FROM unnest(..)`` per table,
which is one round trip however many rows, and reports how many rows were new.
Extra query parameters in the URL (``?search_path=s``) become server settings.
A dropped connection is replaced by the pool on the next acquire, so the store
recovers by itself once the database is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg

from mesh.errors import StorageError
from mesh.storage._common import RowsRefused, first_line, to_utc
from mesh.storage._rows import BATCH_SPECS, JSON_FIELDS, RowSpec
from mesh.storage._sql import Batches, SqlStore
from mesh.storage.models import WriteResult

#: ``pg_advisory_xact_lock`` key that serialises migrations ("mesh" in ASCII).
MIGRATION_LOCK = 0x6D657368
#: ``pg_advisory_xact_lock`` key that makes concurrent prunes take turns per batch ("mesp").
PRUNE_LOCK = 0x6D657370

DEFAULT_POOL_SIZE = 10
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_COMMAND_TIMEOUT = 30.0
_DEADLOCK_RETRIES = 3

# Errors meaning "the database could not be reached or went away".
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)

# Element types of the arrays ``write_batch`` unnests, per table, in column order.
# JSON travels as text and is cast on the way in.
_ARRAY_TYPES: dict[str, tuple[str, ...]] = {
    "events": (
        "text", "bigint", "text", "text", "text", "timestamptz", "text", "text", "text", "int",
        "bytea", "bool", "timestamptz", "text",
    ),
    "deliveries": (
        "text", "text", "text", "int", "text", "int", "float8", "text", "timestamptz", "text",
        "text", "text",
    ),
    "dead_letters": (
        "text", "text", "text", "int", "text", "bytea", "bool", "timestamptz", "bigint", "text",
    ),
    "health_checks": ("text", "text", "timestamptz", "text", "text"),
}  # fmt: skip


def _insert_unnest(spec: RowSpec[Any]) -> str:
    types = _ARRAY_TYPES[spec.table]
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, 1))
    select = ", ".join(f"{f}::jsonb" if f in JSON_FIELDS else f for f in spec.fields)
    return (
        f"INSERT INTO {spec.table} ({spec.columns}) SELECT {select}"
        f" FROM unnest({arrays}) AS u({spec.columns}) ON CONFLICT DO NOTHING"
    )


_INSERTS = {spec.table: _insert_unnest(spec) for spec in BATCH_SPECS}


def _rowcount(status: str) -> int:
    # "INSERT 0 <rows>", "UPDATE <rows>"
    return int(status.rsplit(" ", 1)[-1])


class PostgresStore(SqlStore[asyncpg.Connection]):
    """A ``Store`` on a PostgreSQL database through an asyncpg pool."""

    backend = "postgres"
    _TIME_TYPE = "TIMESTAMPTZ"
    _REGEXP = "~"
    _JSON_CAST = "::jsonb"
    _ENCRYPTED = "encrypted"
    # COLLATE "C": byte order, the order SQLite and Python sort ids in.
    _ID_ORDER = 'id COLLATE "C"'
    _FOR_UPDATE = " FOR UPDATE"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        super().__init__(url)
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None

    @classmethod
    async def open(cls, dsn: str, url: str, **options: Any) -> PostgresStore:
        store = cls(url, **options)
        with store._errors("connect"):
            store._pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=store._pool_size,
                timeout=store._connect_timeout,
                command_timeout=store._command_timeout,
            )
        return store

    async def _disconnect(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._connect_timeout)
        except _CONNECTION_ERRORS:
            pool.terminate()

    # Dialect --------------------------------------------------------------

    @staticmethod
    def _mark(n: int) -> str:
        return f"${n}"

    _ts = staticmethod(to_utc)
    _dt = staticmethod(to_utc)

    # Connections ----------------------------------------------------------

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except _CONNECTION_ERRORS as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else first_line(exc)
            raise StorageError(
                f"database unreachable ({self.url}) during {action}: {reason}"
            ) from exc
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise RowsRefused(f"database {action} refused ({self.url}): {first_line(exc)}") from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(f"database {action} failed ({self.url}): {first_line(exc)}") from exc

    @asynccontextmanager
    async def _acquire(self, action: str) -> AsyncIterator[asyncpg.Connection]:
        pool = self._live(self._pool)
        with self._errors(action):
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn

    @asynccontextmanager
    async def _write(
        self, action: str, *, transaction: bool = True
    ) -> AsyncIterator[asyncpg.Connection]:
        async with self._acquire(action) as conn:
            if not transaction:
                yield conn
                return
            async with conn.transaction():
                yield conn

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        async with self._acquire("query") as conn:
            return list(await conn.fetch(sql, *args))

    async def _fetch_on(
        self, conn: asyncpg.Connection, sql: str, *args: Any
    ) -> list[Sequence[Any]]:
        return list(await conn.fetch(sql, *args))

    async def _execute_on(self, conn: asyncpg.Connection, sql: str, *args: Any) -> None:
        await conn.execute(sql, *args)

    async def _lock_key(self, conn: asyncpg.Connection, spec: RowSpec[Any], key: str) -> None:
        # Two sinks mirroring the same registry change: the second waits, then
        # finds the row as the first left it and writes no second audit row.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{spec.table}:{key}")

    async def _lock_prune(self, conn: asyncpg.Connection) -> None:
        # Two prunes deleting overlapping batches would otherwise wait on each other's
        # row locks in different orders (a deadlock); in turns, the second finds the
        # rows gone. Held for one short batch transaction only.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PRUNE_LOCK)

    # Schema ---------------------------------------------------------------

    async def _lock_migrations(self, conn: asyncpg.Connection) -> None:
        # Held to the end of the transaction: concurrent migrators queue here.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)

    async def _run_script(self, conn: asyncpg.Connection, sql: str) -> None:
        await conn.execute(sql)

    async def applied_migrations(self) -> list[int]:
        async with self._acquire("query") as conn:
            if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
                return []
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [r[0] for r in rows]

    async def ping(self) -> None:
        async with self._acquire("ping") as conn:
            await conn.fetchval("SELECT 1", timeout=self._connect_timeout)

    async def durability_warnings(self) -> list[str]:
        async with self._acquire("query") as conn:
            commit = await conn.fetchval("SHOW synchronous_commit")
            fsync = await conn.fetchval("SHOW fsync")
        warnings = []
        if commit == "off":  # a commit returns before its WAL record is flushed
            warnings.append(
                "PostgreSQL synchronous_commit is off: a power failure can lose rows the sink"
                " has already acknowledged; set it to on (or local, remote_write, remote_apply)"
            )
        if fsync == "off":
            warnings.append("PostgreSQL fsync is off: a power failure can corrupt the database")
        return warnings

    # Writes ---------------------------------------------------------------

    async def _insert_batches(self, batches: Batches) -> WriteResult:
        for attempt in range(1, _DEADLOCK_RETRIES + 1):
            try:
                counts = [0, 0, 0, 0]
                async with self._write("write") as conn:
                    for i, (spec, rows) in enumerate(batches):
                        if rows:
                            columns = [list(c) for c in zip(*rows, strict=True)]
                            status = await conn.execute(_INSERTS[spec.table], *columns)
                            counts[i] = _rowcount(status)
                return WriteResult(*counts)
            except StorageError as exc:
                # Rows go in key order, so writers seldom collide; when they do, the
                # loser's transaction was rolled back and can simply run again.
                retry = isinstance(
                    exc.__cause__, asyncpg.DeadlockDetectedError | asyncpg.SerializationError
                )
                if not retry or attempt == _DEADLOCK_RETRIES:
                    raise
        raise AssertionError("unreachable")

    async def _update_payloads(self, table: str, rows: Sequence[tuple[str, bytes]]) -> int:
        async with self._write("update payloads") as conn:
            status = await conn.execute(
                f"UPDATE {table} AS t SET payload = u.p"
                " FROM unnest($1::text[], $2::bytea[]) AS u(id, p) WHERE t.id = u.id",
                [i for i, _ in rows],
                [p for _, p in rows],
            )
        return _rowcount(status)

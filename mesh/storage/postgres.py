"""PostgreSQL backend: an asyncpg pool.

Batches are inserted with one ``INSERT .. SELECT FROM unnest(..)`` per table,
which is one round trip however many rows, and reports how many rows were new.
Extra query parameters in the URL (``?search_path=s``) become server settings.
A dropped connection is replaced by the pool on the next acquire, so the store
recovers by itself once the database is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import asyncpg

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
    JSON_FIELDS,
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

#: ``pg_advisory_xact_lock`` key that serialises migrations ("mesh" in ASCII).
MIGRATION_LOCK = 0x6D657368

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

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL
)
"""

# Element types of the arrays ``write_batch`` unnests, per table, in column order.
# JSON travels as text and is cast on the way in.
_ARRAY_TYPES: dict[str, tuple[str, ...]] = {
    "events": (
        "text", "bigint", "text", "text", "text", "timestamptz", "text", "text", "text", "int",
        "bytea", "bool", "timestamptz",
    ),
    "deliveries": (
        "text", "text", "text", "int", "text", "int", "float8", "text", "timestamptz", "text",
    ),
    "dead_letters": (
        "text", "text", "text", "int", "text", "bytea", "bool", "timestamptz", "bigint",
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


class PostgresStore:
    """A ``Store`` on a PostgreSQL database through an asyncpg pool."""

    backend = "postgres"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self.url = url
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._closed = False

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

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._connect_timeout)
        except _CONNECTION_ERRORS:
            pool.terminate()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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

    def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError(f"store {self.url} is closed")
        return self._pool

    @asynccontextmanager
    async def _acquire(self, action: str) -> AsyncIterator[asyncpg.Connection]:
        pool = self._get_pool()
        with self._errors(action):
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn

    @asynccontextmanager
    async def _tx(self, action: str) -> AsyncIterator[asyncpg.Connection]:
        async with self._acquire(action) as conn, conn.transaction():
            yield conn

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._acquire("query") as conn:
            return list(await conn.fetch(sql, *args))

    # Schema ---------------------------------------------------------------

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        for migration in load_migrations("postgres"):
            async with self._tx(f"migration {migration.version:04d}") as conn:
                # Held to the end of the transaction: concurrent migrators queue here.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await conn.execute(_BOOTSTRAP)
                if await conn.fetchval(
                    "SELECT 1 FROM schema_migrations WHERE version = $1", migration.version
                ):
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    utcnow(),
                )
            applied.append(migration.version)
        return applied

    async def applied_migrations(self) -> list[int]:
        async with self._acquire("query") as conn:
            if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
                return []
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [r[0] for r in rows]

    async def ping(self) -> None:
        async with self._acquire("ping") as conn:
            await conn.fetchval("SELECT 1", timeout=self._connect_timeout)

    # Sink writes ----------------------------------------------------------

    async def write_batch(
        self,
        events: Iterable[EventRow] = (),
        deliveries: Iterable[DeliveryRow] = (),
        dead_letters: Iterable[DeadLetterRow] = (),
        health_checks: Iterable[HealthCheckRow] = (),
    ) -> WriteResult:
        batches = [
            (spec, spec.prepare(rows, to_utc))
            for spec, rows in zip(
                BATCH_SPECS, (events, deliveries, dead_letters, health_checks), strict=True
            )
        ]
        if not any(rows for _, rows in batches):
            return WriteResult()
        for attempt in range(1, _DEADLOCK_RETRIES + 1):
            try:
                counts = [0, 0, 0, 0]
                async with self._tx("write") as conn:
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

    # Queries --------------------------------------------------------------

    async def query_events(
        self,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[EventRow]:
        where: list[str] = []
        args: list[Any] = []
        if source is not None:
            args.append(source)
            where.append(f"source = ${len(args)}")
        if type is not None:
            regex = type_regex(type)
            args.append(type if regex is None else regex)
            where.append(f"type {'=' if regex is None else '~'} ${len(args)}")
        if since is not None:
            args.append(to_utc(since))
            where.append(f"time >= ${len(args)}")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        args.append(check_limit(limit))
        rows = await self._fetch(
            f"SELECT {EVENTS.columns} FROM events {clause}"
            f" ORDER BY time DESC, stream_seq DESC, id LIMIT ${len(args)}",
            *args,
        )
        return [EVENTS.decode(r, to_utc) for r in rows]

    async def get_event(self, id: str) -> EventRow | None:
        rows = await self._fetch(f"SELECT {EVENTS.columns} FROM events WHERE id = $1", id)
        return EVENTS.decode(rows[0], to_utc) if rows else None

    async def query_deliveries(self, event_id: str) -> list[DeliveryRow]:
        rows = await self._fetch(
            f"SELECT {DELIVERIES.columns} FROM deliveries WHERE event_id = $1"
            " ORDER BY at, attempt, target, id",
            event_id,
        )
        return [DELIVERIES.decode(r, to_utc) for r in rows]

    async def query_dead_letters(
        self, target: str | None = None, limit: int = 100
    ) -> list[DeadLetterRow]:
        rows = await self._fetch(
            f"SELECT {DEAD_LETTERS.columns} FROM dead_letters"
            " WHERE ($1::text IS NULL OR target = $1) ORDER BY dead_at DESC, id LIMIT $2",
            target,
            check_limit(limit),
        )
        return [DEAD_LETTERS.decode(r, to_utc) for r in rows]

    async def count(self, table: Table | str) -> int:
        rows = await self._fetch(f"SELECT count(*) FROM {check_table(table).value}")
        return int(rows[0][0])

    # Registry mirror and audit -------------------------------------------

    async def list_services(self) -> list[ServiceRow]:
        rows = await self._fetch(f"SELECT {SERVICES.columns} FROM services ORDER BY name")
        return [SERVICES.decode(r, to_utc) for r in rows]

    async def upsert_service(
        self, service: ServiceRow, *, actor: str | None = None
    ) -> ServiceRow | None:
        return await self._upsert(SERVICES, service, actor)

    async def delete_service(self, name: str, *, actor: str | None = None) -> ServiceRow | None:
        return await self._delete(SERVICES, name, actor)

    async def list_propagations(self) -> list[PropagationRow]:
        rows = await self._fetch(f"SELECT {PROPAGATIONS.columns} FROM propagations ORDER BY id")
        return [PROPAGATIONS.decode(r, to_utc) for r in rows]

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
        values = ", ".join(
            f"${i}::jsonb" if f in JSON_FIELDS else f"${i}" for i, f in enumerate(spec.fields, 1)
        )
        updates = ", ".join(
            f"{f} = excluded.{f}" for f in spec.fields if f not in (key, "created_at")
        )
        async with self._tx(f"upsert {spec.table}") as conn:
            await self._lock_key(conn, spec, getattr(row, key))
            found = await conn.fetchrow(
                f"SELECT {spec.columns} FROM {spec.table} WHERE {key} = $1 FOR UPDATE",
                getattr(row, key),
            )
            before = spec.decode(found, to_utc) if found else None
            if not reg.changed(before, row):
                return before
            await conn.execute(
                f"INSERT INTO {spec.table} ({spec.columns}) VALUES ({values})"
                f" ON CONFLICT ({key}) DO UPDATE SET {updates}",
                *spec.encode(row, to_utc),
            )
            if actor is not None:
                await self._audit(conn, actor, *reg.audit_upsert(before, row))
        return before

    async def _delete(self, spec: RowSpec[reg.R], key: str, actor: str | None) -> reg.R | None:
        async with self._tx(f"delete from {spec.table}") as conn:
            await self._lock_key(conn, spec, key)
            found = await conn.fetchrow(
                f"DELETE FROM {spec.table} WHERE {spec.key[0]} = $1 RETURNING {spec.columns}",
                key,
            )
            if found is None:
                return None
            before = spec.decode(found, to_utc)
            if actor is not None:
                await self._audit(conn, actor, *reg.audit_delete(before))
        return before

    @staticmethod
    async def _lock_key(conn: asyncpg.Connection, spec: RowSpec[Any], key: str) -> None:
        # Two sinks mirroring the same registry change: the second waits, then
        # finds the row as the first left it and writes no second audit row.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{spec.table}:{key}")

    async def append_audit(
        self, actor: str, action: str, entity: str, before: Any, after: Any
    ) -> int:
        async with self._acquire("audit") as conn:
            return await self._audit(conn, actor, action, entity, before, after)

    async def _audit(
        self,
        conn: asyncpg.Connection,
        actor: str,
        action: str,
        entity: str,
        before: Any,
        after: Any,
    ) -> int:
        value = await conn.fetchval(
            "INSERT INTO audit_log (at, actor, action, entity, before, after)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb) RETURNING id",
            utcnow(),
            actor,
            action,
            entity,
            None if before is None else dump_json(before),
            None if after is None else dump_json(after),
        )
        return int(value)

    async def query_audit(self, entity: str | None = None, limit: int = 100) -> list[AuditRow]:
        rows = await self._fetch(
            f"SELECT {AUDIT.columns} FROM audit_log"
            " WHERE ($1::text IS NULL OR entity = $1) ORDER BY id DESC LIMIT $2",
            entity,
            check_limit(limit),
        )
        return [AUDIT.decode(r, to_utc) for r in rows]

    # Key rotation ---------------------------------------------------------

    async def iter_payloads(
        self, table: Table | str, after_id: str | None = None, batch_size: int = 500
    ) -> AsyncIterator[tuple[str, bytes]]:
        name = check_table(table, payload=True).value
        check_limit(batch_size)
        last = after_id
        while True:
            # COLLATE "C": byte order, the order SQLite and Python sort ids in.
            rows = await self._fetch(
                f"SELECT id, payload FROM {name}"
                ' WHERE encrypted AND ($1::text IS NULL OR id COLLATE "C" > $1)'
                ' ORDER BY id COLLATE "C" LIMIT $2',
                last,
                batch_size,
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
        async with self._tx("update payloads") as conn:
            status = await conn.execute(
                f"UPDATE {name} AS t SET payload = u.p"
                " FROM unnest($1::text[], $2::bytea[]) AS u(id, p) WHERE t.id = u.id",
                [i for i, _ in rows],
                [p for _, p in rows],
            )
        return _rowcount(status)

"""What the SQLite and PostgreSQL stores share: the queries, the registry mirror
and its audit, migrations and payload paging.

A backend supplies its driver calls (``_fetch``, ``_write``, ``_fetch_on``,
``_execute_on``, ``_run_script``, the batch insert and payload update), its
time conversions, and the few SQL spellings that differ between the two
dialects: placeholders, the regular-expression operator, JSON casts and locks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar

from mesh.errors import StorageError
from mesh.storage import _registry as reg
from mesh.storage._common import Params, check_limit, check_table, dump_json, load_migrations
from mesh.storage._history import HistoryQueries, event_filters
from mesh.storage._prune import DEFAULT_BATCH, Pruner
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
    PruneResult,
    ServiceRow,
    Table,
    WriteResult,
    utcnow,
)

C = TypeVar("C")
H = TypeVar("H")
R = TypeVar("R")


def _of(p: Any, tenant: str | None) -> str:
    """`` AND tenant = ...`` when the query is one tenant's (None: an operator's, all)."""
    return "" if tenant is None else f" AND tenant = {p(tenant)}"


#: ``(spec, encoded rows)`` per table of ``BATCH_SPECS``, in that order.
Batches = list[tuple[RowSpec[Any], list[tuple[Any, ...]]]]


class SqlStore(HistoryQueries, ABC, Generic[C]):
    """The ``Store`` methods written once over a backend's connection type ``C``."""

    #: ``"sqlite"`` or ``"postgres"``; also the folder of its migrations.
    backend: str
    #: The column type times are stored in.
    _TIME_TYPE: ClassVar[str]
    #: The operator of ``column OP pattern`` for a regular expression.
    _REGEXP: ClassVar[str]
    #: Appended to the placeholder of a JSON column's value.
    _JSON_CAST: ClassVar[str]
    #: The condition for a row whose payload is encrypted.
    _ENCRYPTED: ClassVar[str]
    #: How ids are compared and ordered when paging through payloads.
    _ID_ORDER: ClassVar[str]
    #: Appended to the ``SELECT`` that reads a registry row before changing it.
    _FOR_UPDATE: ClassVar[str] = ""

    def __init__(self, url: str) -> None:
        self.url = url
        self._closed = False

    # Dialect --------------------------------------------------------------

    @staticmethod
    @abstractmethod
    def _mark(n: int) -> str:
        """The placeholder of the ``n``-th bound value (from 1)."""

    @staticmethod
    @abstractmethod
    def _ts(value: datetime) -> Any:
        """A time as the database stores it."""

    @staticmethod
    @abstractmethod
    def _dt(value: Any) -> datetime:
        """A stored time as an aware UTC datetime."""

    def _params(self) -> Params:
        return Params(self._mark)

    # Connections ----------------------------------------------------------

    @abstractmethod
    async def _disconnect(self) -> None: ...

    async def check(self) -> None:
        await self.ping()  # type: ignore[attr-defined]  # each backend's

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._disconnect()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _live(self, handle: H | None) -> H:
        if handle is None:
            raise StorageError(f"store {self.url} is closed")
        return handle

    @abstractmethod
    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        """Rows of one read, on a connection of the store's own."""

    @abstractmethod
    def _write(self, action: str, *, transaction: bool = True) -> AbstractAsyncContextManager[C]:
        """A connection to write on, in a transaction unless the caller runs one statement."""

    @abstractmethod
    async def _fetch_on(self, conn: C, sql: str, *args: Any) -> list[Sequence[Any]]: ...

    @abstractmethod
    async def _execute_on(self, conn: C, sql: str, *args: Any) -> None: ...

    @abstractmethod
    async def _run_script(self, conn: C, sql: str) -> None:
        """Run a migration file's statements."""

    async def _lock_migrations(self, conn: C) -> None:
        """Serialise migrators beyond what the write transaction already does."""

    async def _lock_key(self, conn: C, spec: RowSpec[Any], key: str) -> None:
        """Serialise writers of one registry row beyond what the transaction already does."""

    async def _lock_prune(self, conn: C) -> None:
        """Serialise the batches of concurrent prunes beyond what the transaction does."""

    # Schema ---------------------------------------------------------------

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        m = self._mark
        for migration in load_migrations(self.backend):
            async with self._write(f"migration {migration.version:04d}") as conn:
                await self._lock_migrations(conn)
                await self._execute_on(
                    conn,
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                    f" applied_at {self._TIME_TYPE} NOT NULL)",
                )
                if await self._fetch_on(
                    conn,
                    f"SELECT 1 FROM schema_migrations WHERE version = {m(1)}",
                    migration.version,
                ):
                    continue
                await self._run_script(conn, migration.sql)
                await self._execute_on(
                    conn,
                    "INSERT INTO schema_migrations (version, name, applied_at)"
                    f" VALUES ({m(1)}, {m(2)}, {m(3)})",
                    migration.version,
                    migration.name,
                    self._ts(utcnow()),
                )
            applied.append(migration.version)
        return applied

    # Sink writes ----------------------------------------------------------

    async def write_batch(
        self,
        events: Iterable[EventRow] = (),
        deliveries: Iterable[DeliveryRow] = (),
        dead_letters: Iterable[DeadLetterRow] = (),
        health_checks: Iterable[HealthCheckRow] = (),
    ) -> WriteResult:
        batches = [
            (spec, spec.prepare(rows, self._ts))
            for spec, rows in zip(
                BATCH_SPECS, (events, deliveries, dead_letters, health_checks), strict=True
            )
        ]
        if not any(rows for _, rows in batches):
            return WriteResult()
        return await self._insert_batches(batches)

    @abstractmethod
    async def _insert_batches(self, batches: Batches) -> WriteResult:
        """Insert encoded rows, at least one, skipping those already present."""

    # Queries --------------------------------------------------------------

    async def query_events(
        self,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        *,
        tenant: str | None = None,
    ) -> list[EventRow]:
        p = self._params()
        where = event_filters(p, self._REGEXP, source, type, tenant)
        if since is not None:
            where.append(f"time >= {p(self._ts(since))}")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._fetch(
            f"SELECT {EVENTS.columns} FROM events {clause}"
            f" ORDER BY time DESC, stream_seq DESC, id LIMIT {p(check_limit(limit))}",
            *p.values,
        )
        return [EVENTS.decode(r, self._dt) for r in rows]

    async def get_event(self, id: str, *, tenant: str | None = None) -> EventRow | None:
        p = self._params()
        rows = await self._fetch(
            f"SELECT {EVENTS.columns} FROM events WHERE id = {p(id)}{_of(p, tenant)}", *p.values
        )
        return EVENTS.decode(rows[0], self._dt) if rows else None

    async def query_deliveries(
        self, event_id: str, *, tenant: str | None = None
    ) -> list[DeliveryRow]:
        p = self._params()
        rows = await self._fetch(
            f"SELECT {DELIVERIES.columns} FROM deliveries"
            f" WHERE event_id = {p(event_id)}{_of(p, tenant)}"
            " ORDER BY at, attempt, target, id",
            *p.values,
        )
        return [DELIVERIES.decode(r, self._dt) for r in rows]

    async def query_dead_letters(
        self, target: str | None = None, limit: int = 100, *, tenant: str | None = None
    ) -> list[DeadLetterRow]:
        return await self._select(
            DEAD_LETTERS, "target", target, "dead_at DESC, id", limit, tenant=tenant
        )

    async def _select(
        self,
        spec: RowSpec[R],
        column: str,
        value: str | None,
        order: str,
        limit: int,
        *,
        tenant: str | None = None,
    ) -> list[R]:
        """Up to ``limit`` rows in ``order``; only those with ``column = value`` if given,
        and of ``tenant`` if given."""
        p = self._params()
        conds = [] if value is None else [f"{column} = {p(value)}"]
        if tenant is not None:
            conds.append(f"tenant = {p(tenant)}")
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        rows = await self._fetch(
            f"SELECT {spec.columns} FROM {spec.table}{where}"
            f" ORDER BY {order} LIMIT {p(check_limit(limit))}",
            *p.values,
        )
        return [spec.decode(r, self._dt) for r in rows]

    async def count(self, table: Table | str) -> int:
        rows = await self._fetch(f"SELECT count(*) FROM {check_table(table).value}")
        return int(rows[0][0])

    # Registry mirror and audit -------------------------------------------

    async def list_services(self) -> list[ServiceRow]:
        rows = await self._fetch(f"SELECT {SERVICES.columns} FROM services ORDER BY name")
        return [SERVICES.decode(r, self._dt) for r in rows]

    async def upsert_service(
        self, service: ServiceRow, *, actor: str | None = None
    ) -> ServiceRow | None:
        return await self._upsert(SERVICES, service, actor)

    async def delete_service(self, name: str, *, actor: str | None = None) -> ServiceRow | None:
        return await self._delete(SERVICES, name, actor)

    async def list_propagations(self) -> list[PropagationRow]:
        rows = await self._fetch(f"SELECT {PROPAGATIONS.columns} FROM propagations ORDER BY id")
        return [PROPAGATIONS.decode(r, self._dt) for r in rows]

    async def upsert_propagation(
        self, propagation: PropagationRow, *, actor: str | None = None
    ) -> PropagationRow | None:
        return await self._upsert(PROPAGATIONS, propagation, actor)

    async def delete_propagation(
        self, id: str, *, actor: str | None = None
    ) -> PropagationRow | None:
        return await self._delete(PROPAGATIONS, id, actor)

    def _value_marks(self, fields: Sequence[str]) -> str:
        return ", ".join(
            self._mark(i) + (self._JSON_CAST if f in JSON_FIELDS else "")
            for i, f in enumerate(fields, 1)
        )

    async def _upsert(self, spec: RowSpec[reg.R], row: reg.R, actor: str | None) -> reg.R | None:
        key = spec.key[0]
        updates = ", ".join(
            f"{f} = excluded.{f}" for f in spec.fields if f not in (key, "created_at")
        )
        async with self._write(f"upsert {spec.table}") as conn:
            await self._lock_key(conn, spec, getattr(row, key))
            found = await self._fetch_on(
                conn,
                f"SELECT {spec.columns} FROM {spec.table} WHERE {key} = {self._mark(1)}"
                + self._FOR_UPDATE,
                getattr(row, key),
            )
            before = spec.decode(found[0], self._dt) if found else None
            if not reg.changed(before, row):
                return before
            await self._execute_on(
                conn,
                f"INSERT INTO {spec.table} ({spec.columns})"
                f" VALUES ({self._value_marks(spec.fields)})"
                f" ON CONFLICT ({key}) DO UPDATE SET {updates}",
                *spec.encode(row, self._ts),
            )
            if actor is not None:
                await self._audit(conn, actor, *reg.audit_upsert(before, row))
        return before

    async def _delete(self, spec: RowSpec[reg.R], key: str, actor: str | None) -> reg.R | None:
        async with self._write(f"delete from {spec.table}") as conn:
            await self._lock_key(conn, spec, key)
            found = await self._fetch_on(
                conn,
                f"DELETE FROM {spec.table} WHERE {spec.key[0]} = {self._mark(1)}"
                f" RETURNING {spec.columns}",
                key,
            )
            if not found:
                return None
            before = spec.decode(found[0], self._dt)
            if actor is not None:
                await self._audit(conn, actor, *reg.audit_delete(before))
        return before

    async def append_audit(
        self,
        actor: str,
        action: str,
        entity: str,
        before: Any,
        after: Any,
        *,
        ref: str | None = None,
        at: datetime | None = None,
    ) -> int | None:
        # One statement: atomic without a transaction of its own.
        async with self._write("audit", transaction=False) as conn:
            return await self._audit(conn, actor, action, entity, before, after, ref=ref, at=at)

    async def _audit(
        self,
        conn: C,
        actor: str,
        action: str,
        entity: str,
        before: Any,
        after: Any,
        *,
        ref: str | None = None,
        at: datetime | None = None,
    ) -> int | None:
        fields = ("at", "actor", "action", "entity", "before", "after", "ref")
        rows = await self._fetch_on(
            conn,
            f"INSERT INTO audit_log ({', '.join(fields)})"
            f" VALUES ({self._value_marks(fields)})"
            + (" ON CONFLICT (ref) DO NOTHING" if ref is not None else "")
            + " RETURNING id",
            self._ts(at or utcnow()),
            actor,
            action,
            entity,
            None if before is None else dump_json(before),
            None if after is None else dump_json(after),
            ref,
        )
        return int(rows[0][0]) if rows else None

    async def query_audit(self, entity: str | None = None, limit: int = 100) -> list[AuditRow]:
        return await self._select(AUDIT, "entity", entity, "id DESC", limit)

    # Retention ------------------------------------------------------------

    async def prune(
        self,
        *,
        events_before: datetime | None = None,
        health_checks_before: datetime | None = None,
        dead_letters_before: datetime | None = None,
        batch_size: int = DEFAULT_BATCH,
        dry_run: bool = False,
        tenant: str | None = None,
        skip_tenants: Collection[str] = (),
    ) -> PruneResult:
        return await Pruner(self, batch_size, tenant=tenant, skip_tenants=skip_tenants).run(
            events_before=events_before,
            health_checks_before=health_checks_before,
            dead_letters_before=dead_letters_before,
            dry_run=dry_run,
        )

    # Key rotation ---------------------------------------------------------

    async def iter_payloads(
        self, table: Table | str, after_id: str | None = None, batch_size: int = 500
    ) -> AsyncIterator[tuple[str, bytes]]:
        name = check_table(table, payload=True).value
        check_limit(batch_size)
        last = after_id
        while True:
            p = self._params()
            after = "" if last is None else f" AND {self._ID_ORDER} > {p(last)}"
            rows = await self._fetch(
                f"SELECT id, payload FROM {name} WHERE {self._ENCRYPTED}{after}"
                f" ORDER BY {self._ID_ORDER} LIMIT {p(batch_size)}",
                *p.values,
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
        return await self._update_payloads(name, rows)

    @abstractmethod
    async def _update_payloads(self, table: str, rows: Sequence[tuple[str, bytes]]) -> int:
        """Replace payloads by id in one transaction; ``rows`` is not empty."""

"""Retention: delete rows older than a cutoff, a bounded batch per transaction.

What goes (the ``audit_log`` is never pruned):

- ``events`` by ``received_at`` (the sink's clock: a publisher sets ``time`` as it
  likes). An event goes together with its delivery attempts, in one transaction,
  and only when none of them is newer than the cutoff: an old event replayed
  yesterday keeps itself and its whole history for another period.
- ``deliveries`` whose event is not in the table (the event never reached the
  sink) by their own ``at``.
- ``health_checks`` by ``at``, ``dead_letters`` by ``dead_at``.

Nothing newer than the cutoff is deleted: every ``DELETE`` repeats the age
condition, so a row written between a batch's read and its delete stays.

Each transaction reads at most ``batch_size`` candidates and deletes those, so
no prune holds a lock for long or builds a huge transaction. Tables with rows
that may be kept (events, deliveries) are walked in (time, key) order after a
cursor: a kept row is passed once, not read again by every batch. Concurrent
prunes (several sinks, the CLI) take turns per batch, SQLite by its write lock
and PostgreSQL by an advisory lock; the later one finds the rows already gone,
so the counts of all of them add up to what was deleted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from mesh.storage._common import Params, check_limit, to_utc
from mesh.storage.models import PruneResult

C = TypeVar("C")

DEFAULT_BATCH = 1000

#: Tables with a ``tenant`` column (schema v5).
TENANT_TABLES = frozenset({"events", "deliveries", "dead_letters"})

# Deliveries of an event that make it stay: attempts at or after the cutoff.
_RECENT_ATTEMPT = "SELECT 1 FROM deliveries d WHERE d.event_id = events.id AND d.at >= {cut}"


def _marks(p: Params, values: Sequence[Any]) -> str:
    return ", ".join(p(v) for v in values)


class PruneSql(Protocol[C]):
    """What a prune runs its statements on: a ``SqlStore`` (``mesh/storage/_sql.py``) with
    ``C`` its connection type. The store owns the pruner, never the other way round."""

    def _ts(self, value: datetime) -> Any: ...

    def _params(self) -> Params: ...

    async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]: ...

    def _write(
        self, action: str, *, transaction: bool = True
    ) -> AbstractAsyncContextManager[C]: ...

    async def _fetch_on(self, conn: C, sql: str, *args: Any) -> list[Sequence[Any]]: ...

    async def _lock_prune(self, conn: C) -> None: ...


class Pruner(Generic[C]):
    """One prune over a ``SqlStore``: ``run`` deletes, or counts in a dry run."""

    def __init__(
        self,
        store: PruneSql[C],
        batch_size: int = DEFAULT_BATCH,
        *,
        tenant: str | None = None,
        skip_tenants: Collection[str] = (),
    ) -> None:
        self.store = store
        self.batch_size = check_limit(batch_size)
        # Per-tenant retention (a tenant's stored_days quota): only ``tenant``'s rows, or
        # every tenant's but those in ``skip_tenants`` (pruned by their own period).
        self.tenant = tenant
        self.skip_tenants = sorted(skip_tenants)

    def _scope(self, p: Params, table: str) -> str:
        """`` AND`` the tenant condition for ``table`` ('' for a table without tenants)."""
        if table not in TENANT_TABLES:
            return ""
        if self.tenant is not None:
            return f" AND {table}.tenant = {p(self.tenant)}"
        if self.skip_tenants:
            return f" AND {table}.tenant NOT IN ({_marks(p, self.skip_tenants)})"
        return ""

    async def run(
        self,
        *,
        events_before: datetime | None = None,
        health_checks_before: datetime | None = None,
        dead_letters_before: datetime | None = None,
        dry_run: bool = False,
    ) -> PruneResult:
        events_cut, health_cut, dead_cut = (
            None if t is None else self.store._ts(to_utc(t))
            for t in (events_before, health_checks_before, dead_letters_before)
        )
        events = deliveries = health = dead = 0
        if events_cut is not None:
            if dry_run:
                events, deliveries = await self._count_events(events_cut)
            else:
                events, deliveries = await self._prune_events(events_cut)
                deliveries += await self._prune_orphan_deliveries(events_cut)
        if health_cut is not None:
            health = await self._prune_simple(
                "health_checks", "at", ("service", "instance", "at"), health_cut, dry_run
            )
        if dead_cut is not None:
            dead = await self._prune_simple("dead_letters", "dead_at", ("id",), dead_cut, dry_run)
        return PruneResult(
            events=events, deliveries=deliveries, dead_letters=dead, health_checks=health
        )

    async def _prune_events(self, cut: Any) -> tuple[int, int]:
        s = self.store

        async def delete(conn: C, rows: list[Sequence[Any]]) -> tuple[int, int]:
            # Marks in text order: SQLite's "?" are positional.
            p = s._params()
            ids = _marks(p, [r[1] for r in rows])
            old = p(cut)
            recent = _RECENT_ATTEMPT.format(cut=p(cut))
            gone = await s._fetch_on(
                conn,
                f"DELETE FROM events WHERE id IN ({ids}) AND received_at < {old}"
                f" AND NOT EXISTS ({recent}) RETURNING id",
                *p.values,
            )
            if not gone:
                return 0, 0
            p = s._params()
            attempts = await s._fetch_on(
                conn,
                f"DELETE FROM deliveries WHERE event_id IN"
                f" ({_marks(p, [r[0] for r in gone])}) AND at < {p(cut)} RETURNING 1",
                *p.values,
            )
            return len(gone), len(attempts)

        return await self._walk("events", "received_at", cut, delete)

    async def _prune_orphan_deliveries(self, cut: Any) -> int:
        s = self.store

        async def delete(conn: C, rows: list[Sequence[Any]]) -> tuple[int, int]:
            p = s._params()
            gone = await s._fetch_on(
                conn,
                f"DELETE FROM deliveries WHERE id IN ({_marks(p, [r[1] for r in rows])})"
                f" AND at < {p(cut)} AND NOT EXISTS"
                " (SELECT 1 FROM events e WHERE e.id = deliveries.event_id) RETURNING 1",
                *p.values,
            )
            return 0, len(gone)

        _, deleted = await self._walk("deliveries", "at", cut, delete)
        return deleted

    async def _walk(
        self,
        table: str,
        column: str,
        cut: Any,
        delete: Callable[[C, list[Sequence[Any]]], Awaitable[tuple[int, int]]],
    ) -> tuple[int, int]:
        """Walk ``table``'s rows older than ``cut`` in ``(column, id)`` order, a batch per
        transaction, handing each batch to ``delete``; returns the sums of what it deleted."""
        s = self.store
        first = second = 0
        after: Sequence[Any] | None = None
        while True:
            async with s._write(f"prune {table}") as conn:
                await s._lock_prune(conn)
                rows = await self._candidates(conn, table, column, cut, after)
                if not rows:
                    break
                a, b = await delete(conn, rows)
                first += a
                second += b
            if len(rows) < self.batch_size:
                break
            after = rows[-1]
            await asyncio.sleep(0)  # let the sink's writes in between batches
        return first, second

    async def _candidates(
        self, conn: C, table: str, column: str, cut: Any, after: Sequence[Any] | None
    ) -> list[Sequence[Any]]:
        """``(time, id)`` of the next rows older than ``cut``, after the cursor ``after``."""
        p = self.store._params()
        where = f"{column} < {p(cut)}"
        if after is not None:
            where += f" AND ({column}, id) > ({p(after[0])}, {p(after[1])})"
        where += self._scope(p, table)
        return await self.store._fetch_on(
            conn,
            f"SELECT {column}, id FROM {table} WHERE {where}"
            f" ORDER BY {column}, id LIMIT {p(self.batch_size)}",
            *p.values,
        )

    async def _prune_simple(
        self, table: str, column: str, key: tuple[str, ...], cut: Any, dry_run: bool
    ) -> int:
        """A table whose every row older than ``cut`` goes: no cursor needed."""
        s = self.store
        if dry_run:
            p = s._params()
            rows = await s._fetch(
                f"SELECT count(*) FROM {table} WHERE {column} < {p(cut)}" + self._scope(p, table),
                *p.values,
            )
            return int(rows[0][0])
        columns = ", ".join(key)
        deleted = 0
        while True:
            async with s._write(f"prune {table}") as conn:
                await s._lock_prune(conn)
                p = s._params()
                gone = await s._fetch_on(
                    conn,
                    f"DELETE FROM {table} WHERE ({columns}) IN (SELECT {columns} FROM {table}"
                    f" WHERE {column} < {p(cut)}{self._scope(p, table)}"
                    f" ORDER BY {column} LIMIT {p(self.batch_size)})"
                    " RETURNING 1",
                    *p.values,
                )
            deleted += len(gone)
            if len(gone) < self.batch_size:
                return deleted
            await asyncio.sleep(0)

    async def _count_events(self, cut: Any) -> tuple[int, int]:
        """What ``_prune_events`` and ``_prune_orphan_deliveries`` would delete now."""
        s = self.store
        # Every value is the cutoff, but marks still go in text order (SQLite's "?").
        p = s._params()
        old = p(cut)
        recent = _RECENT_ATTEMPT.format(cut=p(cut))
        events = await s._fetch(
            f"SELECT count(*) FROM events WHERE received_at < {old}"
            f" AND NOT EXISTS ({recent}){self._scope(p, 'events')}",
            *p.values,
        )
        # An old attempt stays only with an event that stays: new, or with a new attempt.
        p = s._params()
        old = p(cut)
        new = p(cut)
        kept = (
            f"SELECT 1 FROM events WHERE events.id = k.event_id AND"
            f" (events.received_at >= {new} OR EXISTS ({_RECENT_ATTEMPT.format(cut=p(cut))}))"
        )
        scope = self._scope(p, "deliveries").replace("deliveries.", "k.")
        deliveries = await s._fetch(
            f"SELECT count(*) FROM deliveries k WHERE k.at < {old} AND NOT EXISTS ({kept})" + scope,
            *p.values,
        )
        return int(events[0][0]), int(deliveries[0][0])

"""The ``Store`` protocol: what the sink, the CLI and key rotation need from a database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from mesh.storage._history import Page
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
)


@runtime_checkable
class Store(Protocol):
    """A database behind the sink. Every failure to reach it raises ``StorageError``.

    Writes are idempotent on natural keys: writing the same rows twice leaves
    one copy. Mutations of ``services``/``propagations`` return the row as it
    was before (``None`` if there was none); given an ``actor`` they also write
    an ``audit_log`` row in the same transaction, but only when something
    changed, so replaying a registry snapshot audits nothing.
    """

    #: ``"sqlite"`` or ``"postgres"``.
    backend: str
    #: The URL it was opened with, password removed: safe to log.
    url: str

    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied by this call."""
        ...

    async def applied_migrations(self) -> list[int]: ...

    async def ping(self) -> None:
        """Return when the database answers; raise ``StorageError`` otherwise."""
        ...

    async def check(self) -> None:
        """``ping``, and for a database file that it is still there and writable (an
        open connection keeps answering after its file is gone): the health check."""
        ...

    async def durability_warnings(self) -> list[str]:
        """Why a committed write might not survive a power failure (empty: it will)."""
        ...

    async def close(self) -> None:
        """Release connections. Calling it twice is harmless."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def write_batch(
        self,
        events: Iterable[EventRow] = (),
        deliveries: Iterable[DeliveryRow] = (),
        dead_letters: Iterable[DeadLetterRow] = (),
        health_checks: Iterable[HealthCheckRow] = (),
    ) -> WriteResult:
        """Insert all rows in one transaction, skipping rows already present."""
        ...

    async def query_events(
        self,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        *,
        tenant: str | None = None,
    ) -> list[EventRow]:
        """Newest first. ``type`` is a type or a pattern with ``*`` and a final ``>``.

        Every query of events, deliveries and dead letters takes ``tenant``: given, only
        that tenant's rows (``TenantView`` always gives it); None, every tenant's."""
        ...

    async def list_events(
        self,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
        *,
        tenant: str | None = None,
    ) -> Page[EventRow]:
        """One page of events, newest first by ``(time, id)``, ``since <= time < until``
        (empty when ``until <= since``).

        ``cursor`` is a page's ``next_cursor``: the page after it, stable while rows
        are written. At most ``MAX_PAGE`` rows; a bad cursor is a ``ValidationError``.
        """
        ...

    async def list_deliveries(
        self,
        target: str | None = None,
        outcomes: Collection[str] | None = None,
        event_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
        *,
        tenant: str | None = None,
    ) -> Page[DeliveryRow]:
        """One page of delivery attempts, newest first by ``(at, id)``, filtered like
        ``list_events``; ``outcomes`` keeps attempts with any of these outcomes."""
        ...

    async def get_event(self, id: str, *, tenant: str | None = None) -> EventRow | None: ...

    async def query_deliveries(
        self, event_id: str, *, tenant: str | None = None
    ) -> list[DeliveryRow]:
        """Attempts for one event, oldest first."""
        ...

    async def query_dead_letters(
        self, target: str | None = None, limit: int = 100, *, tenant: str | None = None
    ) -> list[DeadLetterRow]:
        """Newest first."""
        ...

    async def count(self, table: Table | str) -> int: ...

    async def list_services(self) -> list[ServiceRow]: ...

    async def upsert_service(
        self, service: ServiceRow, *, actor: str | None = None
    ) -> ServiceRow | None: ...

    async def delete_service(self, name: str, *, actor: str | None = None) -> ServiceRow | None: ...

    async def list_propagations(self) -> list[PropagationRow]: ...

    async def upsert_propagation(
        self, propagation: PropagationRow, *, actor: str | None = None
    ) -> PropagationRow | None: ...

    async def delete_propagation(
        self, id: str, *, actor: str | None = None
    ) -> PropagationRow | None: ...

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
        """Append one audit row; return its id. With ``ref`` (the id of the record it
        comes from) a second row with the same ref is not added: None."""
        ...

    async def query_audit(self, entity: str | None = None, limit: int = 100) -> list[AuditRow]:
        """Newest first."""
        ...

    async def prune(
        self,
        *,
        events_before: datetime | None = None,
        health_checks_before: datetime | None = None,
        dead_letters_before: datetime | None = None,
        batch_size: int = 1000,
        dry_run: bool = False,
        tenant: str | None = None,
        skip_tenants: Collection[str] = (),
    ) -> PruneResult:
        """Delete rows older than each cutoff given (``None``: that table is kept); return
        the counts, or in a dry run what would go, per table.

        Events age by ``received_at`` and go with their delivery attempts, but stay
        while any attempt is newer than the cutoff; deliveries without a stored event
        age by ``at``. Each transaction deletes at most ``batch_size`` rows of a
        table. The audit log is never pruned. Safe to run from several processes.

        ``tenant``: only that tenant's events, deliveries and dead letters (its own
        ``stored_days``); ``skip_tenants``: every tenant's but those (health checks have
        no tenant and are pruned either way).
        """
        ...

    def iter_payloads(
        self, table: Table | str, after_id: str | None = None, batch_size: int = 500
    ) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(id, payload)`` of encrypted rows in id order, after ``after_id``.

        Reads page by page, so rows may be updated while iterating (key rotation).
        """
        ...

    async def update_payloads(self, table: Table | str, rows: Sequence[tuple[str, bytes]]) -> int:
        """Replace payloads by id in one transaction; return rows updated."""
        ...

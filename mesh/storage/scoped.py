"""One tenant's view of a store: every history query carries the tenant, in the SQL.

A tenant's API key and its GraphQL context read through a ``TenantView``, never the
store itself, so a handler that forgets to filter still cannot return another tenant's
events, delivery attempts or dead letters: the rows never leave the database. Only
reads are offered; anything else (writes, prunes, the registry mirror) is an
``AttributeError``, not a silent pass-through.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from mesh.storage._history import Page
from mesh.storage.base import Store
from mesh.storage.models import DeadLetterRow, DeliveryRow, EventRow


class TenantView:
    """The read queries of ``store``, limited to ``tenant``'s rows."""

    def __init__(self, store: Store, tenant: str) -> None:
        self.store = store
        self.tenant = tenant
        self.backend = store.backend
        self.url = store.url

    async def query_events(
        self,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[EventRow]:
        return await self.store.query_events(source, type, since, limit, tenant=self.tenant)

    async def list_events(
        self,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page[EventRow]:
        return await self.store.list_events(
            source, type, since, until, cursor, limit, tenant=self.tenant
        )

    async def list_deliveries(
        self,
        target: str | None = None,
        outcomes: Collection[str] | None = None,
        event_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page[DeliveryRow]:
        return await self.store.list_deliveries(
            target, outcomes, event_id, since, until, cursor, limit, tenant=self.tenant
        )

    async def get_event(self, id: str) -> EventRow | None:
        return await self.store.get_event(id, tenant=self.tenant)

    async def query_deliveries(self, event_id: str) -> list[DeliveryRow]:
        return await self.store.query_deliveries(event_id, tenant=self.tenant)

    async def query_dead_letters(
        self, target: str | None = None, limit: int = 100
    ) -> list[DeadLetterRow]:
        return await self.store.query_dead_letters(target, limit, tenant=self.tenant)


def scoped(store: Store, tenant: str | None) -> Store | TenantView:
    """``store`` for an operator (``tenant`` None), else the tenant's view of it."""
    return store if tenant is None else TenantView(store, tenant)

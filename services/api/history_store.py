"""The sink's database as the API reads it: one store, opened on first need.

The API publishes without any database; only the history routes and GraphQL read
one, so the store is opened (and migrated, as the sink does) when the first of them
asks (a database that is down makes those answer 503, the rest keeps working) and
closed with the service.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from mesh.config import Settings
from mesh.history import PayloadReader
from mesh.storage import Store, open_store


@dataclass(frozen=True)
class History:
    store: Store
    reader: PayloadReader


class HistoryAccess:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._history: History | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> History:
        if self._history is None:
            async with self._lock:
                if self._history is None:
                    store = await open_store(self._settings.database_url)
                    try:
                        # Idempotent and safe beside a migrating sink: a fresh mesh whose
                        # sink has not started yet reads empty tables, not missing ones.
                        await store.migrate()
                    except BaseException:
                        await store.close()
                        raise
                    self._history = History(store, PayloadReader(self._settings))
        return self._history

    async def close(self) -> None:
        found, self._history = self._history, None
        if found is not None:
            await found.store.close()

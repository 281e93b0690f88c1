"""The sink's retention: prune the database soon after start, then every
``MESH_PRUNE_INTERVAL_S``, by the periods in settings (``Store.prune`` says what goes).

Every sink of a deployment prunes; prunes take turns per batch in the database,
so a second sink in the same hour mostly finds nothing left to delete. A prune
that fails (database down) is logged and tried again next round; one cut short
by a stop leaves its current batch rolled back and the rest for the next run.

A tenant with a ``stored_days`` quota (``mesh tenant quota T --stored-days N``) has its
events and delivery attempts kept that long instead of ``MESH_EVENT_RETENTION_DAYS``
(shorter or longer): the general prune skips those tenants, and each gets a prune of
its own rows (``Store.prune(tenant=...)``). The quotas are read from the tenants bucket
every round; when they cannot be read, the round is skipped (pruning by the general
period could delete what a longer quota keeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from mesh.config import Settings
from mesh.errors import StorageError
from mesh.observability import METRICS
from mesh.storage import PruneResult, Store
from mesh.storage.models import utcnow

if TYPE_CHECKING:
    from mesh.client import MeshClient

#: Reads ``{tenant: stored_days}`` for the tenants that have the quota.
TenantDays = Callable[[], Awaitable[dict[str, int]]]


def stored_days_reader(client: MeshClient) -> TenantDays:
    """The tenants' ``stored_days`` quotas, read from the tenants bucket."""

    async def read() -> dict[str, int]:
        from mesh.tenants import TenantStore

        store = await TenantStore.open(client.port, client.names.tenants)
        return {
            t.name: t.quotas.stored_days
            for t in await store.list()
            if t.quotas.stored_days is not None
        }

    return read


# Not at once: a restarted sink first catches up on its feeds, and a crash loop
# does not prune on every start.
FIRST_PRUNE_DELAY_S = 60.0


class Retention:
    """Runs the sink's prunes; ``run`` is its task, ``prune_once`` one prune."""

    def __init__(
        self,
        settings: Settings,
        store: Callable[[], Store | None],
        stopping: asyncio.Event,
        log: Any,
        tenant_days: TenantDays | None = None,
    ) -> None:
        self.settings = settings
        self.tenant_days = tenant_days
        self.first_delay = FIRST_PRUNE_DELAY_S
        self.pruned = 0
        self.prunes = 0
        self._store = store
        self._stopping = stopping
        self._log = log

    @property
    def enabled(self) -> bool:
        # With tenants' quotas to read, always: a tenant's stored_days applies even when
        # the general periods keep everything.
        return self.settings.retention_enabled or self.tenant_days is not None

    async def run(self) -> None:
        s = self.settings
        self._log.info(
            "retention",
            event_days=s.event_retention_days or "forever",
            health_days=s.health_retention_days or "forever",
            dead_letter_days=s.dead_letter_retention_days or "forever",
            interval_s=s.prune_interval_s,
        )
        delay = self.first_delay
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            await self.prune_once()
            delay = s.prune_interval_s

    async def prune_once(self, now: datetime | None = None) -> PruneResult | None:
        """Prune by the settings as of ``now``; None if the database is not there now."""
        store = self._store()
        if store is None:
            self._log.info("prune skipped: database unreachable; next round tries again")
            return None
        now = now or utcnow()
        cutoffs = self.settings.retention_cutoffs(now)
        try:
            days = {} if self.tenant_days is None else await self.tenant_days()
        except Exception as exc:  # NATS down, a broken entry: not a reason to stop the sink
            self._log.warning("prune skipped: tenants' quotas unreadable", error=str(exc))
            return None
        started = time.monotonic()
        try:
            result = await store.prune(
                events_before=cutoffs["events_before"],
                health_checks_before=cutoffs["health_checks_before"],
                dead_letters_before=cutoffs["dead_letters_before"],
                batch_size=self.settings.prune_batch,
                skip_tenants=days.keys(),
            )
            for tenant, n in sorted(days.items()):
                result += await store.prune(
                    events_before=now - timedelta(days=n),
                    dead_letters_before=cutoffs["dead_letters_before"],
                    batch_size=self.settings.prune_batch,
                    tenant=tenant,
                )
        except StorageError as exc:
            self._log.warning("prune failed; next round tries again", error=str(exc))
            return None
        counts = result.as_dict()
        for table, n in counts.items():
            if n:
                METRICS.sink_rows_pruned.labels(table).inc(n)
        self.pruned += result.total
        self.prunes += 1
        self._log.info(
            "pruned",
            **counts,
            took_ms=round((time.monotonic() - started) * 1000, 1),
            **{k: v.isoformat() for k, v in cutoffs.items() if v is not None},
        )
        return result

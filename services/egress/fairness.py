"""Fair shares of the egress's in-flight requests between tenants.

One instance has ``max_in_flight`` slots (``DEFAULT_MAX_IN_FLIGHT``) for requests on
the wire across all its targets, and each target its own ``max_in_flight``. Without
more, one tenant's many slow targets (long timeouts, each holding its slots until it
times out) could hold every slot of the instance and delay every other tenant's
deliveries. So while targets of two or more tenants are active, a tenant holds at most
``share`` of the slots (``MESH_EGRESS_TENANT_SHARE``, default 0.5): a request takes
its tenant's slot first, then an instance slot, so a tenant at its cap waits without
taking an instance slot from anyone. With one tenant (every mesh without tenants) the
cap is the whole instance, as before. Open circuits pause their consumers and hold no
slot; a backlog is a consumer's own pending count and never blocks another consumer.

Memory: one semaphore per tenant with an active webhook target in this instance.
"""

from __future__ import annotations

import asyncio
from collections import Counter


class TenantSlots:
    def __init__(self, total: int, share: float) -> None:
        self.total = total
        self.share = share
        self.active: Counter[str] = Counter()  # tenant -> active webhook workers
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._cap = total

    def cap(self) -> int:
        if len(self.active) <= 1:
            return self.total
        return max(1, int(self.total * self.share))

    def _resize(self) -> None:
        cap = self.cap()
        if cap != self._cap:
            # New waiters use the new cap; requests already out finish under the old one.
            self._cap = cap
            self._slots.clear()

    def add(self, tenant: str) -> None:
        self.active[tenant] += 1
        self._resize()

    def remove(self, tenant: str) -> None:
        self.active[tenant] -= 1
        if self.active[tenant] <= 0:
            del self.active[tenant]
            self._slots.pop(tenant, None)
        self._resize()

    def slot(self, tenant: str) -> asyncio.Semaphore:
        found = self._slots.get(tenant)
        if found is None:
            found = self._slots[tenant] = asyncio.Semaphore(self._cap)
        return found

"""Tenant quotas at the API: targets held and events/s published (mesh/tenants.py).

A tenant's events/s quota is read from the bucket at most every ``RATE_CACHE_S`` per
tenant (one read for a burst of publishes, not one per request: the read was the
largest cost of a ``POST /v1/events``); this instance forgets it at once when its own
API changes the quota (``forget``), the others within ``RATE_CACHE_S``.
"""

from __future__ import annotations

import asyncio
import math
import time
from weakref import WeakKeyDictionary

from mesh.tenants import PublishQuota, QuotaExceeded
from services.api import tenancy
from services.api.problems import CONFLICT, RATE_LIMITED, ApiProblem
from services.api.routing import Call

_publish = PublishQuota()
RATE_CACHE_S = 2.0


class _Rates:
    """Tenants' events/s quotas as read lately, for one client (one broker)."""

    def __init__(self) -> None:
        self.read: dict[str, tuple[float, float | None]] = {}  # tenant -> (read at, events/s)
        self.reading: dict[str, asyncio.Future[float | None]] = {}


_rates: WeakKeyDictionary[object, _Rates] = WeakKeyDictionary()


def forget(call: Call, tenant: str) -> None:
    """Read the tenant's quota afresh next time (it was changed through this instance)."""
    found = _rates.get(call.api.client)
    if found is not None:
        found.read.pop(tenant, None)


async def _events_per_s(call: Call, tenant: str) -> float | None:
    rates = _rates.get(call.api.client)
    if rates is None:
        rates = _rates[call.api.client] = _Rates()
    now = time.monotonic()
    cached = rates.read.get(tenant)
    if cached is not None and now - cached[0] < RATE_CACHE_S:
        return cached[1]
    # One read per tenant at a time: a burst of requests waits for the first one's answer.
    pending = rates.reading.get(tenant)
    if pending is None:

        async def read() -> float | None:
            return (await (await tenancy.store(call)).get(tenant)).quotas.events_per_s

        pending = rates.reading[tenant] = asyncio.ensure_future(read())
        pending.add_done_callback(lambda _: rates.reading.pop(tenant, None))
    rate = await asyncio.shield(pending)
    if len(rates.read) >= 10_000:
        rates.read.clear()
    rates.read[tenant] = (now, rate)
    return rate


async def check_target_quota(call: Call, tenant: str) -> None:
    """409 when the tenant already holds its ``max_targets``."""
    limit = (await (await tenancy.store(call)).get(tenant)).quotas.max_targets
    if limit is None:
        return
    held = sum(1 for t in await call.api.client.registry.list_targets() if t.tenant == tenant)
    if held >= limit:
        raise ApiProblem(CONFLICT, f"tenant {tenant!r} holds its quota of {limit} targets")


async def tenant_for_new_target(call: Call, asked: str | None) -> str:
    """The tenant a new target goes to (``tenancy.tenant_for_create``), within its quota."""
    tenant = await tenancy.tenant_for_create(call, asked)
    await check_target_quota(call, tenant)
    return tenant


async def take_publish_quota(call: Call, tenant: str, n: int = 1) -> None:
    """429 with ``Retry-After`` when publishing ``n`` events would pass the tenant's events/s."""
    rate = await _events_per_s(call, tenant)
    try:
        _publish.take(tenant, rate, n)
    except QuotaExceeded as exc:
        raise ApiProblem(
            RATE_LIMITED,
            str(exc),
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
        ) from None

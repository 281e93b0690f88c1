"""Tenant quotas at the API: targets held and events/s published (mesh/tenants.py)."""

from __future__ import annotations

import math

from mesh.tenants import PublishQuota, QuotaExceeded
from services.api import tenancy
from services.api.problems import CONFLICT, RATE_LIMITED, ApiProblem
from services.api.routing import Call

_publish = PublishQuota()


async def check_target_quota(call: Call, tenant: str) -> None:
    """409 when the tenant already holds its ``max_targets``."""
    limit = (await (await tenancy.store(call)).get(tenant)).quotas.max_targets
    if limit is None:
        return
    held = sum(1 for t in await call.api.client.registry.list_targets() if t.tenant == tenant)
    if held >= limit:
        raise ApiProblem(CONFLICT, f"tenant {tenant!r} holds its quota of {limit} targets")


async def take_publish_quota(call: Call, tenant: str, n: int = 1) -> None:
    """429 with ``Retry-After`` when publishing ``n`` events would pass the tenant's events/s."""
    rate = (await (await tenancy.store(call)).get(tenant)).quotas.events_per_s
    try:
        _publish.take(tenant, rate, n)
    except QuotaExceeded as exc:
        raise ApiProblem(
            RATE_LIMITED,
            str(exc),
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
        ) from None

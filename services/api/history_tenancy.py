"""Tenant scoping of the history routes: a tenant key reads the sink's tables through a
``TenantView`` (``mesh/storage/scoped.py``: the tenant is in every query's SQL), and the
DLQ stream's dead letters, their retry and a target's replay only for its own targets.

A tenant key lists deliveries across its targets or of one; dead letters (read from the
stream, which has no tenant column) of one named target (``target=NAME``). Another
tenant's target is a 404 with the words a missing one gets (``services/api/tenancy.py``).
An operator key (no tenant) is not limited.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from mesh.errors import NotFound
from mesh.storage import Store, TenantView, scoped
from mesh.tenants import visible
from services.api import tenancy
from services.api.problems import INVALID, ApiProblem
from services.api.routing import Call

T = TypeVar("T")


async def history(call: Call) -> Store | TenantView:
    """The sink's database as the caller may read it: an operator key all of it, a tenant
    key its ``TenantView`` (each query carries the tenant in its SQL)."""
    return scoped(await call.api.store(), call.tenant)


async def own_target(call: Call, name: str | None, what: str, required: bool = True) -> None:
    """Nothing for an operator key; for a tenant key, ``name`` must be one of its targets
    (``required``: a name must be given)."""
    if call.tenant is None or (name is None and not required):
        return
    if name is None:
        raise ApiProblem(INVALID, f"a tenant key lists one target's {what}: pass target=NAME")
    missing = f"unknown target {name!r}"
    try:
        target = await call.api.client.registry.get_target(name)
    except NotFound:
        raise NotFound(missing) from None
    tenancy.check(call, target.tenant, missing)


async def visible_targets(call: Call) -> set[str] | None:
    """The names of the caller's targets; None for an operator key (all)."""
    if call.tenant is None:
        return None
    targets = await call.api.client.registry.list_targets()
    return {t.name for t in targets if visible(t.tenant, call.tenant)}


def only_visible(items: Iterable[T], mine: set[str] | None, target_of: str = "target") -> list[T]:
    return [i for i in items if mine is None or getattr(i, target_of) in mine]

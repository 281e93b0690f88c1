"""Tenant scoping of the history routes the portal uses (deliveries, one event, dead
letters, their retry, a target's replay): a tenant key sees only its own targets'.

A tenant key names the target it lists (``target=NAME``: its deliveries and dead
letters are those of its targets, and a listing across targets would have to filter
pages after the fact); another tenant's target is a 404 with the words a missing one
gets (``services/api/tenancy.py``). An operator key (no tenant) is not limited.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from mesh.errors import NotFound
from mesh.tenants import visible
from services.api import tenancy
from services.api.problems import INVALID, ApiProblem
from services.api.routing import Call

T = TypeVar("T")


async def own_target(call: Call, name: str | None, what: str) -> None:
    """Nothing for an operator key; for a tenant key, ``name`` must be one of its targets."""
    if call.tenant is None:
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

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
from typing import Any, TypeVar

from mesh.errors import NotFound
from mesh.ownership import find_target
from mesh.storage import Store, TenantView, scoped
from mesh.subjects import split_source
from mesh.tenants import visible
from services.api.problems import INVALID, ApiProblem
from services.api.routing import Call

T = TypeVar("T")


async def history(call: Call) -> Store | TenantView:
    """The sink's database as the caller may read it: an operator key all of it, a tenant
    key its ``TenantView`` (each query carries the tenant in its SQL)."""
    return scoped(await call.api.store(), call.tenant)


async def own_target(call: Call, name: str | None, what: str, required: bool = True) -> str | None:
    """The reference of target ``name`` as the caller means it (a tenant's own target is
    ``~T.name``, mesh/subjects.py), None without a name. For a tenant key, ``name`` must be
    one of its targets (``required``: a name must be given); an operator's unknown name is
    kept as given (a removed target's dead letters may remain)."""
    found = await find(call, name, what, required)
    if found is None:
        return name
    return str(found.ref)


async def find(call: Call, name: str | None, what: str, required: bool = True) -> Any:
    """The target the caller names (None: no name, or an operator's unknown one)."""
    if name is None:
        if call.tenant is not None and required:
            raise ApiProblem(INVALID, f"a tenant key lists one target's {what}: pass target=NAME")
        return None
    try:
        return await find_target(call.api.client.registry, name, call.tenant)
    except NotFound:
        if call.tenant is not None:
            raise NotFound(f"unknown target {name!r}") from None
        return None


async def deliveries_of(call: Call, name: str | None) -> tuple[Store | TenantView, str | None]:
    """The history store and the target name to list deliveries of ``name`` with: rows
    carry (tenant, target name), so an operator's named target brings its tenant."""
    found = await find(call, name, "deliveries", required=False)
    if call.tenant is not None or name is None:
        return await history(call), None if found is None else found.name
    if found is not None:
        return scoped(await call.api.store(), found.tenant), found.name
    if name.startswith("~"):  # a removed tenant target
        tenant, plain = split_source(name)
        return scoped(await call.api.store(), tenant), plain
    return await history(call), name


async def visible_targets(call: Call) -> set[str] | None:
    """The references of the caller's targets (as dead letters name them); None for an
    operator key (all)."""
    if call.tenant is None:
        return None
    targets = await call.api.client.registry.list_targets()
    return {t.ref for t in targets if visible(t.tenant, call.tenant)}


def only_visible(items: Iterable[T], mine: set[str] | None, target_of: str = "target") -> list[T]:
    return [i for i in items if mine is None or getattr(i, target_of) in mine]

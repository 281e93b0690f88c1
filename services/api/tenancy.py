"""Tenant scoping for handlers: what a tenant key may see, and in which tenant it creates.

A tenant key (``ApiKey.tenant`` set) sees only its tenant's records: another
tenant's are answered exactly like a missing one (404, the same words), so a key
learns nothing about other tenants. An operator key (no tenant) sees all. Routes
declare ``tenant_aware=True`` once their handlers use these helpers; the others
are a 404 for every tenant key (``routing._endpoint``).
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from mesh.errors import NotFound, ValidationError
from mesh.ownership import find_target
from mesh.registry import Target
from mesh.tenants import DEFAULT, TenantStore, visible

__all__ = ["check", "store", "target", "tenant_for_create", "visible"]
from services.api.routing import Call

_stores: WeakKeyDictionary[object, TenantStore] = WeakKeyDictionary()


async def store(call: Call) -> TenantStore:
    client = call.api.client
    found = _stores.get(client)
    if found is None:
        found = await TenantStore.open(
            client.port, client.names.tenants, client.settings.stream_replicas
        )
        _stores[client] = found
    return found


async def target(call: Call) -> Target:
    """The path's target, if the caller's tenant owns it (else the same 404 as a missing one)."""
    return await find_target(call.api.client.registry, call.params["name"], call.tenant)


def check(call: Call, owner: str | None, missing: str) -> None:
    """404 (``missing``, the words a missing record gets) unless the caller sees ``owner``."""
    if not visible(owner, call.tenant):
        raise NotFound(missing)


async def tenant_for_create(call: Call, asked: str | None) -> str:
    """The tenant a new record goes to: a tenant key's own; an operator's choice (must exist)."""
    mine = call.tenant
    if mine is not None:
        if asked not in (None, mine):
            raise ValidationError(f"this key creates in its own tenant {mine!r} only")
        return mine
    tenant = asked or DEFAULT
    await (await store(call)).get(tenant)  # NotFound for an unknown tenant
    return tenant

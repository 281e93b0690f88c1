"""Tenants: ``/v1/tenants`` (the same calls as ``mesh tenant``; mesh/tenants.py).

An operator key (no tenant) lists, creates, deletes tenants and sets their quotas;
a tenant key sees its own tenant only (list, get) and nothing else (404).
Deleting a tenant that still holds targets, propagations or API keys is a 409.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from mesh.apikeys import ApiKeyStore, Scope
from mesh.tenants import Quotas, Tenant, delete_empty, visible
from services.api import quotas, tenancy
from services.api.routing import NAME_PATTERN, Call, Param, Reply, Route, RouteTable

TENANT = Param("tenant", "path", "The tenant's name", pattern=NAME_PATTERN)


class TenantIn(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="The tenant's name (a service name)")
    quotas: Quotas = Field(default_factory=Quotas)


class QuotaPatch(BaseModel):
    """Quotas to change; those left out keep their value; null removes a quota."""

    events_per_s: float | None = Field(default=None, gt=0)
    max_targets: int | None = Field(default=None, ge=0)
    stored_days: int | None = Field(default=None, ge=1)


class TenantRemoved(BaseModel):
    removed: str


async def list_tenants(call: Call) -> list[Tenant]:
    tenants = await (await tenancy.store(call)).list()
    return [t for t in tenants if visible(t.name, call.tenant)]


async def get_tenant(call: Call) -> Tenant:
    name = call.params["tenant"]
    tenancy.check(call, name, f"unknown tenant {name!r}")
    return await (await tenancy.store(call)).get(name)


async def create_tenant(call: Call) -> Reply:
    body: TenantIn = call.body
    tenant = await (await tenancy.store(call)).create(body.name, body.quotas)
    await call.api.audit.record(
        call.actor, "tenant.create", f"tenant:{tenant.name}", None, tenant.model_dump(mode="json")
    )
    return Reply(tenant, status=201)


async def set_quotas(call: Call) -> Tenant:
    name = call.params["tenant"]
    store = await tenancy.store(call)
    before = await store.get(name)
    after = await store.set_quotas(name, **call.body.model_dump(exclude_unset=True))
    quotas.forget(call, name)
    await call.api.audit.record(
        call.actor,
        "tenant.quota",
        f"tenant:{name}",
        before.model_dump(mode="json"),
        after.model_dump(mode="json"),
    )
    return after


async def delete_tenant(call: Call) -> TenantRemoved:
    name = call.params["tenant"]
    store = await tenancy.store(call)
    before = await store.get(name)
    client = call.api.client
    keys = await ApiKeyStore.open(client.js, client.names.apikeys, client.settings.stream_replicas)
    await delete_empty(store, client.registry, keys, name)
    await call.api.audit.record(
        call.actor, "tenant.delete", f"tenant:{name}", before.model_dump(mode="json"), None
    )
    return TenantRemoved(removed=name)


def register(table: RouteTable) -> None:
    tags = ("tenants",)
    table.extend(
        [
            Route(
                "GET",
                "/v1/tenants",
                list_tenants,
                "List tenants (a tenant key: its own)",
                tags,
                Scope.READ,
                "listTenants",
                response=list[Tenant],
            ),
            Route(
                "GET",
                "/v1/tenants/{tenant}",
                get_tenant,
                "One tenant and its quotas",
                tags,
                Scope.READ,
                "getTenant",
                response=Tenant,
                problems=(404,),
                params=(TENANT,),
            ),
        ],
        tenant_aware=True,
    )
    table.extend(
        [
            Route(
                "POST",
                "/v1/tenants",
                create_tenant,
                "Create a tenant (operator keys)",
                tags,
                Scope.ADMIN,
                "createTenant",
                body=TenantIn,
                response=Tenant,
                status=201,
                problems=(409,),
            ),
            Route(
                "PATCH",
                "/v1/tenants/{tenant}/quota",
                set_quotas,
                "Change a tenant's quotas (operator keys)",
                tags,
                Scope.ADMIN,
                "setTenantQuota",
                body=QuotaPatch,
                response=Tenant,
                problems=(404,),
                params=(TENANT,),
            ),
            Route(
                "DELETE",
                "/v1/tenants/{tenant}",
                delete_tenant,
                "Delete a tenant that holds nothing any more (operator keys)",
                tags,
                Scope.ADMIN,
                "deleteTenant",
                response=TenantRemoved,
                problems=(404, 409),
                params=(TENANT,),
            ),
        ]
    )

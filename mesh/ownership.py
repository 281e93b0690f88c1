"""Which tenant owns what, for the registry and the client (mesh/tenants.py has the rest).

Kept apart from ``mesh.registry`` (which imports it) so it needs no registry at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from mesh.errors import NotFound

if TYPE_CHECKING:
    from mesh.tenants import ClientQuota


# Registry types are Any here: mesh.registry imports this module.
def own(props: list[Any], targets: list[Any], name: str) -> list[Any]:
    """The propagations of target ``name``'s tenant (the only ones that may reach it)."""
    tenant = next((t.tenant for t in targets if t.name == name), "default")
    return [p for p in props if p.tenant == tenant]


async def tenant_target(registry: Any, name: str, tenant: str, strict: bool = True) -> Any:
    """Target ``name`` if ``tenant`` owns it, else ``NotFound`` in the words of a missing one;
    not ``strict``: the ``default`` tenant (an operator's client) sees every target."""
    target = await registry.get_target(name)
    if target.tenant != tenant and (strict or tenant != "default"):
        raise NotFound(f"unknown target {name!r}")
    return target


_client_quotas: WeakKeyDictionary[Any, ClientQuota] = WeakKeyDictionary()


async def take_client_quota(client: Any, n: int) -> None:
    """The events/s quota of a tenant's ``MeshClient`` (``MESH_TENANT``, not ``default``)."""
    tenant = client.settings.tenant
    if tenant == "default":
        return
    quota = _client_quotas.get(client)
    if quota is None:
        from mesh.tenants import ClientQuota  # it imports the registry, which imports us

        quota = _client_quotas[client] = ClientQuota(client.port, client.names.tenants, tenant)
    await quota.take(n)

"""Which tenant owns what, for the registry and the client (mesh/tenants.py has the rest).

Kept apart from ``mesh.registry`` (which imports it) so it needs no registry at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from mesh.errors import NotFound, ValidationError
from mesh.subjects import target_ref, validate_target_ref

if TYPE_CHECKING:
    from mesh.registry_models import Target
    from mesh.tenants import ClientQuota


# Registry types are Any here: mesh.registry imports this module.
async def tenant_target(registry: Any, name: str, tenant: str, strict: bool = True) -> Target:
    """Target ``name`` of ``tenant``, else ``NotFound`` in the words of a missing one;
    not ``strict``: the ``default`` tenant (an operator's client) sees every target."""
    operator = not strict and tenant == "default"
    return await find_target(registry, name, None if operator else tenant)


async def find_target(registry: Any, name: str, tenant: str | None) -> Target:
    """The target a caller of ``tenant`` (None: an operator, every tenant) means by ``name``.

    ``name`` is a target's name in the caller's tenant, or a reference ``~T.name``. For
    tenant T, its target ``name`` is ``~T.name``, or (made before target names were per
    tenant) the mesh-wide ``name`` that T owns; another tenant's is a ``NotFound`` in the
    words of a missing one. An operator's plain name is the entry of that name (the default
    tenant's, or an older tenant target's), else the one tenant target of that name (two
    tenants holding it: a ``ValidationError`` asking for ``~T.name``).
    """
    found: Target
    validate_target_ref(name)
    missing = NotFound(f"unknown target {name!r}")
    if name.startswith("~"):
        found = await registry.get_target(name)
        if tenant is not None and found.tenant != tenant:
            raise missing
        return found
    if tenant is not None and tenant != "default":
        try:
            found = await registry.get_target(target_ref(tenant, name))
            return found
        except NotFound:
            pass
    try:
        found = await registry.get_target(name)
    except NotFound:
        if tenant is not None:
            raise missing from None
        held = [t for t in await registry.list_targets() if t.name == name and t.scoped]
        if len(held) == 1:
            one: Target = held[0]
            return one
        if not held:
            raise missing from None
        refs = ", ".join(sorted(t.ref for t in held))
        raise ValidationError(
            f"target name {name!r} is held by several tenants: name one of {refs}"
        ) from None
    if tenant is not None and found.tenant != tenant:
        raise missing
    return found


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

"""Tenants: one mesh serving many customers, each seeing only its own resources.

A tenant is a name with the service-name grammar (``mesh.subjects.validate_name``).
Targets, propagations, API keys (and, through them, events, deliveries and dead
letters) belong to exactly one tenant; a record without a tenant belongs to
``default``, which always exists and cannot be deleted, so a mesh that never
heard of tenants behaves as before.

Tenants live in a JetStream KV bucket (``<PREFIX>_TENANTS``): ``tenants.<name>``
-> ``Tenant`` JSON, with its quotas. ``default`` needs no entry (an absent entry
reads as unlimited quotas); ``mesh tenant quota default ...`` writes one.

Quotas (None: unlimited)::

    events_per_s   events published per second, over the API and the client
                   publish path (429 / ``QuotaExceeded``); a second's worth of burst
    max_targets    targets the tenant may hold (409 / ``QuotaExceeded`` past it)
    stored_days    how long the sink keeps the tenant's events and deliveries
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field
from pydantic import ValidationError as PydValidationError

from mesh._nats.buckets import read
from mesh._nats.types import KeyValue, js_errors
from mesh.apikeys import ApiKeyStore
from mesh.errors import Conflict, MeshError, NotFound
from mesh.resilience import RateLimiter
from mesh.subjects import validate_name

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort

DEFAULT = "default"


class QuotaExceeded(MeshError):
    """A tenant is over one of its quotas (HTTP 429 for rates, 409 for counts)."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _now() -> datetime:
    return datetime.now(UTC)


class Quotas(BaseModel):
    events_per_s: float | None = Field(default=None, gt=0)
    max_targets: int | None = Field(default=None, ge=0)
    stored_days: int | None = Field(default=None, ge=1)


class Tenant(BaseModel):
    name: str
    quotas: Quotas = Field(default_factory=Quotas)
    created_at: datetime = Field(default_factory=_now)


def validate_tenant(name: str) -> str:
    return validate_name(name, "tenant")


def visible(owner: str | None, caller: str | None) -> bool:
    """Whether a caller scoped to ``caller`` (None: an operator) may see a record of ``owner``."""
    return caller is None or (owner or DEFAULT) == caller


class TenantStore:
    """The bucket of tenants."""

    def __init__(self, port: JetStreamPort, kv: KeyValue, bucket: str) -> None:
        self.port = port
        self.kv = kv
        self.bucket = bucket

    @classmethod
    async def open(cls, port: JetStreamPort, bucket: str, replicas: int = 1) -> TenantStore:
        kv = await port.open_bucket(bucket, history=1, replicas=replicas)
        return cls(port, kv, bucket)

    async def create(self, name: str, quotas: Quotas | None = None) -> Tenant:
        validate_tenant(name)
        if name == DEFAULT:
            raise Conflict("tenant 'default' always exists")
        tenant = Tenant(name=name, quotas=quotas or Quotas())
        try:
            await self.kv.create(f"tenants.{name}", tenant.model_dump_json().encode())
        except js_errors.KeyWrongLastSequenceError:
            raise Conflict(f"tenant {name!r} exists") from None
        return tenant

    async def get(self, name: str) -> Tenant:
        validate_tenant(name)
        found = await read(self.kv, f"tenants.{name}")
        if found is None:
            if name == DEFAULT:
                return Tenant(name=DEFAULT, created_at=datetime.fromtimestamp(0, UTC))
            raise NotFound(f"unknown tenant {name!r}")
        return Tenant.model_validate_json(found[0])

    async def exists(self, name: str) -> bool:
        try:
            await self.get(name)
        except NotFound:
            return False
        return True

    async def list(self) -> list[Tenant]:
        out: dict[str, Tenant] = {}
        for raw in (await self.port.read_all(self.kv, self.bucket)).values():
            try:
                tenant = Tenant.model_validate_json(raw)
            except PydValidationError:
                continue
            out[tenant.name] = tenant
        if DEFAULT not in out:
            out[DEFAULT] = await self.get(DEFAULT)
        return sorted(out.values(), key=lambda t: (t.name != DEFAULT, t.name))

    async def set_quotas(self, name: str, **changes: float | int | None) -> Tenant:
        """Change some quotas (a key given as None clears that quota)."""
        tenant = await self.get(name)
        merged = tenant.quotas.model_dump() | changes
        tenant.quotas = Quotas.model_validate(merged)
        await self.kv.put(f"tenants.{name}", tenant.model_dump_json().encode())
        return tenant

    async def delete(self, name: str) -> None:
        validate_tenant(name)
        if name == DEFAULT:
            raise Conflict("tenant 'default' cannot be deleted")
        if await read(self.kv, f"tenants.{name}") is None:
            raise NotFound(f"unknown tenant {name!r}")
        await self.kv.purge(f"tenants.{name}")


async def holdings(registry: Any, keys: ApiKeyStore, name: str) -> list[str]:
    """What still belongs to a tenant, in words ("2 targets", ...); empty when nothing."""
    targets, props = await registry.targets_and_propagations()
    counts = {
        "targets": sum(t.tenant == name for t in targets),
        "propagations": sum(p.tenant == name for p in props),
        "live API keys": sum(k.tenant == name and k.state() == "active" for k in await keys.list()),
    }
    return [f"{n} {what}" for what, n in counts.items() if n]


async def delete_empty(store: TenantStore, registry: Any, keys: ApiKeyStore, name: str) -> None:
    """Delete a tenant that holds nothing any more (``Conflict`` naming what it holds)."""
    await store.get(name)
    held = await holdings(registry, keys, name)
    if held:
        raise Conflict(f"tenant {name!r} still holds {', '.join(held)}: remove them first")
    await store.delete(name)


class PublishQuota:
    """Per-tenant events/s token buckets, in one process (the API, or a client)."""

    def __init__(self) -> None:
        self._limiters: dict[str, RateLimiter] = {}

    def take(self, tenant: str, rate: float | None, n: int = 1) -> None:
        """Spend ``n`` events of the tenant's rate or raise ``QuotaExceeded`` (nothing spent)."""
        if rate is None:
            self._limiters.pop(tenant, None)
            return
        limiter = self._limiters.get(tenant)
        if limiter is None:
            limiter = self._limiters[tenant] = RateLimiter(rate, burst=max(1.0, rate))
        elif limiter.rate != rate:
            limiter.set_rate(rate, burst=max(1.0, rate))
        wait = 0.0
        for _ in range(n):
            wait = limiter.reserve()
        if wait > 0:
            limiter.tokens += n  # refused: nothing is spent
            raise QuotaExceeded(
                f"tenant {tenant!r} is over its quota of {rate:g} events/s", retry_after_s=wait
            )


class ClientQuota:
    """The events/s quota of the tenant a client publishes as (``MESH_TENANT``), read from
    the bucket at most every ``refresh_s``; ``take`` raises ``QuotaExceeded`` past it."""

    def __init__(
        self, port: JetStreamPort, bucket: str, tenant: str, refresh_s: float = 5.0
    ) -> None:
        self.port = port
        self.bucket = bucket
        self.tenant = tenant
        self.refresh_s = refresh_s
        self._store: TenantStore | None = None
        self._rate: float | None = None
        self._read_at = -1e18
        self._buckets = PublishQuota()

    async def take(self, n: int = 1) -> None:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            if self._store is None:
                self._store = await TenantStore.open(self.port, self.bucket)
            self._rate = (await self._store.get(self.tenant)).quotas.events_per_s
            self._read_at = now
        self._buckets.take(self.tenant, self._rate, n)

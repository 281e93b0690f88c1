"""What the egress hands each of its target workers: the objects they share and the
few calls back they need. Workers never see the ``WebhookEgress`` object itself, so a
worker can be read, tested or replaced without the service (issue #15)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from services.egress.fairness import TenantSlots

if TYPE_CHECKING:
    from mesh._nats.types import Msg
    from mesh.client import MeshClient
    from mesh.delivery import Deliveries
    from mesh.records import DeliveryRecord
    from services.egress.circuit import CircuitStore
    from services.egress.http.sender import HttpSender


class Record(Protocol):
    """Publish one delivery record; ``settle`` is the message its attempt finished, acked
    once the record is stored (``WebhookEgress.record``)."""

    def __call__(self, rec: DeliveryRecord, *, settle: Msg | None = None) -> Awaitable[None]: ...


@dataclass(frozen=True)
class EgressShared:
    """One egress instance's shared parts, built by the service once it has started."""

    client: MeshClient
    deliveries: Deliveries  # pull, decode, route check, dead letters
    log: Any  # the service's bound structlog logger
    instance: str
    circuits: CircuitStore
    http: HttpSender
    slots: asyncio.Semaphore  # requests on the wire across every target of the instance
    fetch_expires_s: float
    # Calls back into the service:
    spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]  # an owned task
    instance_count: Callable[[], int]  # egress instances alive (rate shares)
    record: Record  # publish one delivery record
    # Publish a batch's records as one message; ack the messages once it is stored.
    record_batch: Callable[[list[DeliveryRecord], list[Msg]], Awaitable[None]]
    sync_target: Callable[[str], Coroutine[Any, Any, None]]  # re-read one target from the registry
    # Each tenant's share of ``slots`` (services/egress/fairness.py); none: no tenant cap.
    tenant_slots: TenantSlots = field(default_factory=lambda: TenantSlots(1 << 30, 1.0))

"""The registry's records: targets (with their kinds, status and retry policy) and
propagations (with their modes), as pydantic models stored as JSON in the registry
bucket. ``mesh.registry`` re-exports them; import them from there."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from mesh.destinations import EXTRAS, DestinationOptions
from mesh.subjects import consumer_of, target_ref


def now() -> datetime:
    return datetime.now(UTC)


class TargetKind(StrEnum):
    WEBHOOK = "webhook"
    NATS = "nats"
    STREAM = "stream"
    AMQP = "amqp"
    MQTT = "mqtt"
    REDIS = "redis"
    SQS = "sqs"
    S3 = "s3"
    KAFKA = "kafka"


# The kinds the egress delivers (one driver each); the others are read by consumers.
EGRESS_KINDS = frozenset({TargetKind.WEBHOOK, *(TargetKind(k) for k in EXTRAS)})
DESTINATION_KINDS = frozenset(TargetKind(k) for k in EXTRAS)


class TargetStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class PropagationMode(StrEnum):
    UNIDIRECTIONAL = "unidirectional"
    BIDIRECTIONAL = "bidirectional"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"


class RetryPolicy(BaseModel):
    base_s: float = Field(default=1.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1)
    max_delay_s: float = Field(default=300.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=100)
    jitter: float = Field(default=0.1, ge=0, le=1)


class Target(BaseModel):
    name: str
    tenant: str = "default"  # mesh/tenants.py; entries written before tenants: 'default'
    # Named in its tenant (``ref`` = ``~tenant.name``): every tenant target made since
    # target names are per tenant. False: named mesh-wide (``ref`` = ``name``), as every
    # target before that, so a tenant's older target keeps its key, consumer and
    # subjects (docs/ARCHITECTURE.md, Tenants).
    scoped: bool = False
    kind: TargetKind
    url: str | None = None
    format: Literal["standard", "cloudevents"] = "standard"
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    rate: float | None = Field(default=None, gt=0)  # events per second
    max_in_flight: int = Field(default=16, ge=1, le=10_000)
    ordered: bool = False
    # JMESPath over the data, applied after the propagation's own (mesh/transform.py).
    transform: str | None = None
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    circuit_threshold: int = Field(default=5, ge=1)
    circuit_open_s: float = Field(default=60.0, gt=0)
    # Secrets are Fernet tokens under the key ring, never plaintext.
    secret_enc: str | None = None
    old_secret_enc: str | None = None
    old_secret_expires: datetime | None = None
    # Non-HTTP destinations: ``url`` is shown with its password redacted; the whole URL
    # is sealed in ``url_enc``, like a webhook secret.
    url_enc: str | None = None
    options: DestinationOptions | None = None
    status: TargetStatus = TargetStatus.ACTIVE
    status_reason: str | None = None
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)

    @property
    def ref(self) -> str:
        """The reference naming this target in keys, consumers and subjects (unique in the
        mesh): ``name`` for the default tenant's (and older tenant targets), else
        ``~tenant.name``."""
        return target_ref(self.tenant, self.name) if self.scoped else self.name

    @property
    def consumer(self) -> str:
        return consumer_of(self.ref)

    def public(self) -> dict[str, Any]:
        """Everything but the secrets, for listings."""
        doc = self.model_dump(
            mode="json", exclude={"secret_enc", "old_secret_enc", "url_enc", "scoped"}
        )
        doc["ref"] = self.ref
        doc["has_secret"] = self.secret_enc is not None
        doc["rotating"] = bool(
            self.old_secret_enc and self.old_secret_expires and self.old_secret_expires > now()
        )
        return doc


class Propagation(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    tenant: str = "default"
    mode: PropagationMode
    source: str
    targets: list[str] = Field(default_factory=list)
    types: str | None = None
    # CESQL over attributes and data (mesh/cesql), and JMESPath over the data.
    filter: str | None = None
    transform: str | None = None
    created_at: datetime = Field(default_factory=now)

    def describe(self) -> str:
        arrow = "<->" if self.mode == PropagationMode.BIDIRECTIONAL else "->"
        dest = "*" if self.mode == PropagationMode.BROADCAST else ",".join(self.targets)
        types = f" [{self.types}]" if self.types else ""
        return f"{self.source} {arrow} {dest}{types}"

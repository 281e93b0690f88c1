"""Rows of the sink's tables, as plain frozen dataclasses.

Times are timezone-aware UTC datetimes on the way out; on the way in any aware
datetime is accepted and converted (a naive one is a ``ValidationError``).
Payloads are the bytes exactly as stored in JetStream: a Fernet token when
``encrypted`` is true. The store never decrypts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self


def utcnow() -> datetime:
    return datetime.now(UTC)


class Table(StrEnum):
    """The tables a store knows; ``count`` and the payload helpers take one of these."""

    EVENTS = "events"
    DELIVERIES = "deliveries"
    DEAD_LETTERS = "dead_letters"
    HEALTH_CHECKS = "health_checks"
    SERVICES = "services"
    PROPAGATIONS = "propagations"
    AUDIT_LOG = "audit_log"
    SCHEMA_MIGRATIONS = "schema_migrations"


#: Tables whose rows carry a ``payload`` (ciphertext) column.
PAYLOAD_TABLES = frozenset({Table.EVENTS, Table.DEAD_LETTERS})


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRow:
    """One published event. ``subject`` is the NATS subject it was stored under;
    ``ce_subject`` is the optional CloudEvents ``subject`` attribute."""

    id: str
    subject: str
    source: str
    type: str
    time: datetime
    payload: bytes
    encrypted: bool = False
    stream_seq: int | None = None
    datacontenttype: str | None = None
    ce_subject: str | None = None
    origin: str | None = None
    hops: int = 0
    received_at: datetime = field(default_factory=utcnow)
    tenant: str = "default"  # from a qualified source ~T.<source> (mesh/subjects.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRow:
    """One delivery attempt; ``id`` is the attempt record's own id."""

    id: str
    event_id: str
    target: str
    attempt: int
    outcome: str
    at: datetime
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    instance: str | None = None
    trace_id: str | None = None  # W3C trace id the event carried
    tenant: str = "default"  # the target's tenant (the egress's record says it)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterRow:
    """An event given up on for one target, with the last error."""

    id: str
    event_id: str
    target: str
    attempts: int
    last_error: str | None
    payload: bytes
    encrypted: bool
    dead_at: datetime
    stream_seq: int | None = None
    tenant: str = "default"  # from the original event's subject (~T.<source>)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckRow:
    service: str
    instance: str
    at: datetime
    status: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceRow:
    """The registry's view of a service/target, mirrored by the sink."""

    name: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "active"
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True, slots=True, kw_only=True)
class PropagationRow:
    id: str
    mode: str
    source: str
    targets: list[str] = field(default_factory=list)
    types: str | None = None
    created_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    action: str
    entity: str
    before: Any
    after: Any


@dataclass(frozen=True, slots=True)
class TableCounts:
    """A number of rows per table of the sink."""

    events: int = 0
    deliveries: int = 0
    dead_letters: int = 0
    health_checks: int = 0

    @property
    def total(self) -> int:
        return self.events + self.deliveries + self.dead_letters + self.health_checks

    def __add__(self, other: Self) -> Self:
        return type(self)(
            self.events + other.events,
            self.deliveries + other.deliveries,
            self.dead_letters + other.dead_letters,
            self.health_checks + other.health_checks,
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "events": self.events,
            "deliveries": self.deliveries,
            "dead_letters": self.dead_letters,
            "health_checks": self.health_checks,
        }


@dataclass(frozen=True, slots=True)
class WriteResult(TableCounts):
    """Rows actually inserted by one ``write_batch``; duplicates are not counted."""


@dataclass(frozen=True, slots=True)
class PruneResult(TableCounts):
    """Rows deleted (or, in a dry run, that would be) by one ``prune``, per table."""

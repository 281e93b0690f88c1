"""Request and response models of the history routes (``routes_history.py``).

Each rule a request must follow is in its schema where JSON Schema can say it (patterns,
bounds, a replay window that is a time range or a sequence range), so the OpenAPI
document states it and schemathesis can hold the routes to it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from mesh.storage import MAX_PAGE
from services.api.routes_targets import TYPES_PATTERN
from services.api.routing import NAME_PATTERN, REF_PATTERN

MAX_SEQ = 2**63 - 1  # JetStream sequences are 64-bit


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 9999-12-31T23:00-05:00 is past the last representable time in UTC (and
        # 0001-01-01T01:00+05:00 before the first): as a bound it is the end (start).
        return (datetime.max if value.year > 1 else datetime.min).replace(tzinfo=UTC)


#: A time with a zone (a naive one is refused: it would be read as the server's local time).
UtcTime = Annotated[AwareDatetime, AfterValidator(_utc)]
Limit = Field(default=50, ge=1, le=MAX_PAGE, description="At most this many rows")
Cursor = Field(default=None, max_length=512, description="A page's next_cursor: the next page")
Since = Field(default=None, description="From this time on (ISO 8601 with a zone)")
Until = Field(default=None, description="Before this time (ISO 8601 with a zone)")


# Models -----------------------------------------------------------------------------


class EventOut(BaseModel):
    id: str
    seq: int | None
    time: datetime
    source: str
    type: str
    subject: str
    datacontenttype: str | None
    origin: str | None
    hops: int
    encrypted: bool
    received_at: datetime
    data: Any = Field(description="The data, decrypted and decoded for display")


class DeliveryOut(BaseModel):
    id: str
    event_id: str
    target: str
    attempt: int
    outcome: str = Field(description="delivered, retry, dead, disabled, skipped or circuit_open")
    status_code: int | None
    latency_ms: float | None
    error: str | None
    response_excerpt: str | None = Field(
        description="The start of the receiver's answer to a failed attempt, if it sent one"
    )
    at: datetime
    instance: str | None
    trace_id: str | None = Field(
        default=None,
        description="The W3C trace id the event carried (find its spans in a tracing back end)",
    )


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: last")


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: last")


class EventDetail(BaseModel):
    event: EventOut | None = Field(description="Null when only attempts were stored")
    deliveries: list[DeliveryOut] = Field(description="Every attempt, oldest first")


class EventsQuery(BaseModel):
    source: str | None = Field(default=None, pattern=NAME_PATTERN)
    type: str | None = Field(
        default=None,
        max_length=255,
        pattern=TYPES_PATTERN,
        description="A type or a pattern: order.*, order.>",
    )
    since: UtcTime | None = Since
    until: UtcTime | None = Until
    cursor: str | None = Cursor
    limit: int = Limit


class DeliveriesQuery(BaseModel):
    target: str | None = Field(default=None, pattern=REF_PATTERN)
    outcome: list[str] | None = Field(
        default=None, description="Only these outcomes (repeat the parameter)"
    )
    event_id: str | None = Field(default=None, max_length=128)
    since: UtcTime | None = Since
    until: UtcTime | None = Until
    cursor: str | None = Cursor
    limit: int = Limit


class DeadLetterOut(BaseModel):
    seq: int = Field(description="The DLQ stream sequence")
    dlq_id: str
    event_id: str
    target: str = Field(description="The target's name")
    tenant: str = Field(default="default", description="The target's tenant")
    source: str | None
    type: str | None
    attempts: int
    error: str
    at: datetime
    original_subject: str
    encrypted: bool
    size: int


class DeadLetterList(BaseModel):
    items: list[DeadLetterOut] = Field(description="Oldest first")
    unreadable: int = Field(description="Messages on the DLQ that are not dead letters")
    next_cursor: str | None = Field(
        default=None, description="Pass as cursor for the next page; null: last"
    )


class DeadLettersQuery(BaseModel):
    target: str | None = Field(default=None, pattern=REF_PATTERN)
    since: UtcTime | None = Field(
        default=None, description="From this time on (ISO 8601 with a zone); not with cursor"
    )
    cursor: str | None = Cursor
    limit: int = Field(default=100, ge=1, le=MAX_PAGE, description="At most this many rows")


class RetryIn(BaseModel):
    target: str | None = Field(default=None, pattern=REF_PATTERN)
    since: UtcTime | None = Since
    ids: list[str] = Field(
        default_factory=list, max_length=1000, description="Only these event / dead letter ids"
    )


class KeptOut(BaseModel):
    event_id: str
    seq: int
    target: str
    reason: str


class RetryOut(BaseModel):
    replayed: int = Field(description="Sent back to delivery and removed from the DLQ")
    duplicates: int
    failed: list[KeptOut] = Field(description="Left in the DLQ: could not be republished")
    skipped: list[KeptOut] = Field(description="Left in the DLQ: no target to send them to")
    disabled_targets: list[str] = Field(description="Targets that hold their events until resumed")


class PurgeQuery(BaseModel):
    target: str = Field(
        pattern=r"^(\*|(~[a-z0-9][a-z0-9_-]{0,63}\.)?[a-z0-9][a-z0-9_-]{0,63})$",
        description="The target whose dead letters go, or * for every target's",
    )
    since: UtcTime | None = Since


class Purged(BaseModel):
    purged: int


class _ReplayBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    types: str | None = Field(
        default=None, max_length=255, pattern=TYPES_PATTERN, description="Only matching types"
    )
    dry_run: bool = Field(default=False, description="Count and sample, publish nothing")


class ReplayByTime(_ReplayBase):
    """Events the stream stored from ``since`` (to ``until``, default now)."""

    since: UtcTime = Field(description="Replay from this time")
    until: UtcTime | None = Field(default=None, description="...up to this time")


class ReplayBySeq(_ReplayBase):
    """Events with stream sequences from ``from_seq`` (to ``to_seq``, inclusive)."""

    from_seq: int = Field(ge=1, le=MAX_SEQ, description="Replay from this stream sequence")
    to_seq: int | None = Field(
        default=None, ge=1, le=MAX_SEQ, description="...up to this one, inclusive"
    )


ReplayIn = ReplayByTime | ReplayBySeq


class ReplayItemOut(BaseModel):
    seq: int
    id: str
    source: str
    type: str
    stored_at: datetime


class ReplayOut(BaseModel):
    target: str
    since: datetime | None
    until: datetime | None
    from_seq: int | None
    to_seq: int | None
    types: str | None
    filters: list[str]
    dry_run: bool
    scanned: int
    matched: int
    published: int
    duplicates: int = Field(description="Already replayed within the duplicate window")
    skipped: int
    sample: list[ReplayItemOut] = Field(description="The first events matched")

"""Messages and registry entries -> the sink's rows.

Pure functions, no I/O: each reads what it can from a NATS message (subject,
headers, JetStream metadata) and returns the row to store. Payloads are copied
as they are; nothing is decrypted.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from mesh import envelope
from mesh._nats.types import Msg
from mesh.delivery import MessageHeaders
from mesh.errors import DecodeError, MeshError
from mesh.observability import HeartbeatInfo
from mesh.records import DeliveryRecord, parse_dead_letter, read_delivery_message
from mesh.registry import Propagation, Target
from mesh.storage import (
    DeadLetterRow,
    DeliveryRow,
    EventRow,
    HealthCheckRow,
    PropagationRow,
    ServiceRow,
)
from mesh.subjects import DEFAULT_TENANT, TENANT_MARK, Subjects, split_source, validate_name

Row = EventRow | DeliveryRow | DeadLetterRow


def _now() -> datetime:
    return datetime.now(UTC)


def _position(msg: Msg) -> tuple[int | None, datetime]:
    """Stream sequence, and when JetStream stored the message (the same on every
    redelivery, so a stored row does not depend on when the sink read it)."""
    try:
        meta = msg.metadata  # parsed from the reply subject on every access
        return meta.sequence.stream, meta.timestamp
    except Exception:  # not a JetStream message (tests, tools)
        return None, _now()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _parse_time(value: str | None, fallback: datetime) -> datetime:
    if not value:
        return fallback
    try:
        return _aware(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return fallback


def _encrypted(headers: Mapping[str, str] | None) -> bool:
    return bool((headers or {}).get(envelope.H_ENCRYPTION))


def event_row(msg: Msg, subjects: Subjects) -> tuple[EventRow, str | None]:
    """The row for a message on the events stream, and what is wrong with it, if anything.

    The attributes are read straight from the ``ce-*`` headers (the sink's hot path);
    a message is stored even when they fail the checks ``envelope.decode`` makes,
    which is then asked to name the problem. Nothing is decrypted.
    """
    headers = msg.headers or {}
    seq, stored = _position(msg)
    try:
        source, etype, _ = subjects.parse_event(msg.subject)
    except MeshError:
        source, etype = "", ""
    view = MessageHeaders(headers)
    hops = view.hops_text
    row = EventRow(
        id=view.event_id(seq),
        stream_seq=seq,
        subject=msg.subject,
        source=view.source or source,
        type=view.type or etype,
        time=_parse_time(view.time, stored),
        datacontenttype=view.datacontenttype,
        ce_subject=view.subject,
        origin=view.origin or source,
        hops=int(hops) if hops.isdigit() else 0,
        payload=msg.data,
        encrypted=_encrypted(headers),
        received_at=stored,
        tenant=split_source(source)[0],  # the subject's: a ce-source cannot choose it
    )
    consistent = source and (
        view.id is None  # a plain message: everything comes from the subject
        or (
            view.specversion == envelope.SPECVERSION
            and view.source == source
            and view.type == etype
            and hops.isdigit()
        )
    )
    return row, None if consistent else _problem(msg, headers, seq, subjects)


def _problem(
    msg: Msg, headers: Mapping[str, str], seq: int | None, subjects: Subjects
) -> str | None:
    # The encryption header set aside, so decode checks attributes and decrypts nothing.
    attrs = {k: v for k, v in headers.items() if k != envelope.H_ENCRYPTION}
    try:
        envelope.decode(
            msg.subject, attrs, b"", None, seq=seq, subjects=subjects, decode_body=False
        )
    except DecodeError as exc:
        return str(exc)
    return None


def _tenant(name: object) -> str:
    """A record's tenant, if it is a valid name; else ``default``."""
    try:
        return validate_name(name, "tenant") if isinstance(name, str) else DEFAULT_TENANT
    except MeshError:
        return DEFAULT_TENANT


def _subject_tenant(subject: str, subjects: Subjects) -> str:
    """The tenant of an event subject (``<prefix>.evt.~T.<source>...``, or a replay's);
    ``default`` when it is none of those."""
    try:
        return split_source(subjects.parse_event(subject)[0])[0]
    except MeshError:
        return DEFAULT_TENANT


def delivery_rows(msg: Msg) -> list[DeliveryRow]:
    """The rows for a delivery-attempt message: a batch of attempts (the egress's) or one
    record (older egresses, the bridge, ``consume``). Raises ``DecodeError``."""
    recs, batch = read_delivery_message(msg.data)
    if not batch:
        # A single record: the publisher set Nats-Msg-Id to its id; prefer it, it is stable.
        return [_delivery_row(recs[0], (msg.headers or {}).get(envelope.H_MSG_ID), msg)]
    return [_delivery_row(rec, None, msg) for rec in recs]


def _delivery_row(rec: DeliveryRecord, msg_id: str | None, msg: Msg) -> DeliveryRow:
    try:
        owner, name = split_source(str(rec.target))  # a tenant's target: ~tenant.name
        return DeliveryRow(
            id=msg_id or rec.id,
            event_id=str(rec.event_id),
            target=name,
            attempt=int(rec.attempt),
            outcome=str(rec.outcome),
            status_code=None if rec.status_code is None else int(rec.status_code),
            latency_ms=None if rec.latency_ms is None else float(rec.latency_ms),
            error=rec.error,
            at=_parse_time(rec.at, _position(msg)[1]),
            instance=rec.instance,
            trace_id=None if rec.trace_id is None else str(rec.trace_id)[:32],
            tenant=owner if str(rec.target).startswith(TENANT_MARK) else _tenant(rec.tenant),
        )
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"not a delivery record: {exc}") from None


def dead_letter_row(msg: Msg, subjects: Subjects) -> tuple[DeadLetterRow, str | None]:
    """The row for a dead letter; one with unreadable ``mesh-dlq-*`` headers is kept too."""
    seq, stored = _position(msg)
    headers = msg.headers or {}
    try:
        dl = parse_dead_letter(headers, msg.data)
        owner, name = split_source(dl.target)  # a tenant's target: ~tenant.name
        scoped = dl.target.startswith(TENANT_MARK)
        return (
            DeadLetterRow(
                id=dl.id,
                event_id=dl.event_id,
                target=name,
                attempts=dl.attempts,
                last_error=dl.error,
                payload=dl.body,
                encrypted=_encrypted(headers),
                dead_at=_aware(dl.at),
                stream_seq=seq,
                tenant=owner if scoped else _subject_tenant(dl.original_subject, subjects),
            ),
            None,
        )
    except DecodeError as exc:
        problem = str(exc)
    owner, target = split_source(subjects.target_of(msg.subject or "", "dlq"))
    row = DeadLetterRow(
        id=headers.get(envelope.H_MSG_ID) or f"dlq-seq-{seq}",
        event_id=MessageHeaders(headers).id or "",
        target=target,
        tenant=owner,
        attempts=0,
        last_error=problem,
        payload=msg.data,
        encrypted=_encrypted(headers),
        dead_at=stored,
        stream_seq=seq,
    )
    return row, problem


def health_row(body: bytes) -> HealthCheckRow:
    """The row for a heartbeat message. Raises ``ValueError`` or ``TypeError``."""
    info = HeartbeatInfo.parse(body)
    return HealthCheckRow(
        service=str(info.service),
        instance=str(info.instance),
        at=_parse_time(info.at, _now()),
        status=str(info.status),
        stats=info.stats if isinstance(info.stats, dict) else {},
    )


def service_row(target: Target) -> ServiceRow:
    config = target.model_dump(
        mode="json",
        exclude={
            "name",
            "kind",
            "status",
            "created_at",
            "updated_at",
            "secret_enc",
            "old_secret_enc",
        },
    )
    config["has_secret"] = target.secret_enc is not None
    return ServiceRow(
        name=target.ref,  # unique in the mesh: a tenant's target is ~tenant.name
        kind=str(target.kind),
        config=config,
        status=str(target.status),
        created_at=_aware(target.created_at),
        updated_at=_aware(target.updated_at),
    )


def propagation_row(prop: Propagation) -> PropagationRow:
    return PropagationRow(
        id=prop.id,
        mode=str(prop.mode),
        source=prop.source,
        targets=list(prop.targets),
        types=prop.types,
        created_at=_aware(prop.created_at),
    )


__all__ = [
    "Row",
    "dead_letter_row",
    "delivery_rows",
    "event_row",
    "health_row",
    "propagation_row",
    "service_row",
]

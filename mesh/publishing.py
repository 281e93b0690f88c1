"""Building events: ``build_event`` and the size check behind ``MeshClient.build`` and
``publish``. The publishing itself is ``mesh._nats`` (``JetStreamPort``)."""

from __future__ import annotations

from typing import Any

from mesh import envelope
from mesh.envelope import Event
from mesh.errors import PayloadTooLarge, ValidationError
from mesh.subjects import validate_source, validate_type

#: One encoded event: ``(NATS subject, headers, body, source)``.
Encoded = tuple[str, dict[str, str], bytes, str]


def build_event(
    source: str,
    event_type: str,
    data: Any = None,
    *,
    id: str | None = None,
    subject: str | None = None,
    datacontenttype: str | None = None,
    cause: Event | None = None,
) -> Event:
    """A new event from a checked source (a name, or a tenant's ``~T.name``), type and
    id; raises ``ValidationError``."""
    validate_source(source)
    validate_type(event_type)
    event = Event(source=source, type=event_type, data=data, subject=subject)
    if datacontenttype:
        event.datacontenttype = datacontenttype
    elif isinstance(data, bytes | bytearray):
        event.datacontenttype = envelope.OCTETS
    if id is not None:
        if not id or len(id) > 128 or any(c.isspace() for c in id):
            raise ValidationError("an event id is 1-128 characters without spaces")
        event.id = id
    if cause is not None:
        event.origin = cause.effective_origin
        event.hops = cause.hops + 1
    return event


def check_size(nats_subject: str, headers: dict[str, str], body: bytes, max_payload: int) -> None:
    """Raise ``PayloadTooLarge`` for a message the server would refuse."""
    size = (
        len(body)
        + len(nats_subject)
        + sum(map(len, headers))
        + sum(map(len, headers.values()))
        + 4 * len(headers)
    )
    if size > max_payload:
        raise PayloadTooLarge(size, max_payload)

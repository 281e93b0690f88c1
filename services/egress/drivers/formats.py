"""How an event looks at each destination (the mappings are listed in docs/ARCHITECTURE.md).

- binary mode (AMQP, MQTT 5, SQS): the data is the message body, the CloudEvents
  attributes travel as the transport's headers/properties;
- structured mode (S3 objects, and SQS when the attributes would not fit): one JSON
  document ``application/cloudevents+json`` with the attributes and ``data`` (or
  ``data_base64`` for bytes that are not UTF-8);
- Redis stream entries: one field per attribute plus ``data``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from mesh.destinations import template_fields
from mesh.envelope import JSON, MSGPACK, Event
from services.egress.http.sender import rfc3339

STRUCTURED = "application/cloudevents+json"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def attributes(event: Event) -> dict[str, str]:
    """The CloudEvents context attributes and extensions as strings (no data)."""
    attrs = {
        "specversion": "1.0",
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "time": rfc3339(event),
    }
    if event.subject:
        attrs["subject"] = event.subject
    attrs.update(event.extensions)
    return attrs


def data_body(event: Event) -> tuple[bytes, str]:
    """The data as a message body and its content type (as the webhook's binary mode:
    bytes as they are, text as text, everything else as JSON; msgpack is decoded)."""
    ctype = event.datacontenttype
    if isinstance(event.data, bytes):
        return event.data, (ctype if ctype != MSGPACK else "application/octet-stream")
    if isinstance(event.data, str) and ctype.startswith("text/"):
        return event.data.encode(), ctype
    return _dumps(event.json_data()), JSON


def structured(event: Event) -> bytes:
    """The whole event as one CloudEvents JSON document."""
    doc: dict[str, Any] = dict(attributes(event))
    body, ctype = data_body(event)
    doc["datacontenttype"] = ctype
    if ctype == JSON:
        doc["data"] = json.loads(body)
    else:
        try:
            doc["data"] = body.decode()
        except UnicodeDecodeError:
            doc["data_base64"] = base64.b64encode(body).decode()
    return _dumps(doc)


def fields_of(event: Event) -> dict[str, Any]:
    """What a template may name for this event."""
    return template_fields(event.id, event.source, event.type, event.subject)

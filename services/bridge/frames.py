"""What goes over a bridge socket: event frames and close codes, shared by the session
(feeds) and the tail readers."""

from __future__ import annotations

import json
from typing import Any

from mesh import tracing
from mesh.envelope import Event

CLOSE_SLOW = 1013  # try again later
CLOSE_GOING_AWAY = 1001
CLOSE_ERROR = 1011
CLOSE_REVOKED = 1008  # policy violation: the session's token was revoked


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), default=str)


def event_frame(event: Event, seq: int) -> dict[str, Any]:
    frame = {
        "seq": seq,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "time": event.time.isoformat(),
        "data": event.json_data(),
    }
    if tracing.EXT_TRACEPARENT in event.extensions:
        # The event's W3C trace context, so a client can continue the publisher's trace.
        frame.update(tracing.w3c_headers(event))
    return frame

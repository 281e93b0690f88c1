"""The sink's history as documents: event data decrypted for display, attempts as JSON.

Shared by ``mesh events``/``mesh deliveries`` and the HTTP API, so both show the
same fields. Payloads are ciphertext in the database; they are decrypted here,
for display only, with the key ring; without a usable key the data says so.
"""

from __future__ import annotations

import re
from typing import Any

from mesh.config import Settings
from mesh.crypto import KeyRing
from mesh.envelope import OCTETS, decode_data, to_jsonable
from mesh.errors import MeshError
from mesh.records import Outcome
from mesh.storage import DeliveryRow, EventRow

#: Outcomes of an attempt that failed (skipped and circuit-open attempts sent nothing).
FAILURE_OUTCOMES = frozenset({Outcome.RETRY.value, Outcome.DEAD.value, Outcome.DISABLED.value})

# The webhook egress writes a failed answer as "HTTP <status> <reason>: <body excerpt>".
_HTTP_ERROR = re.compile(r"^HTTP \d{3}[^:]*: (?P<excerpt>.+)$", re.DOTALL)


class PayloadReader:
    """Turns stored payloads back into data; loads the key ring on first need."""

    def __init__(self, s: Settings, keyring: KeyRing | None = None) -> None:
        self._settings = s
        self._ring: KeyRing | None = keyring
        self.problem: str | None = None

    def _keyring(self) -> KeyRing | None:
        if self._ring is None and self.problem is None:
            try:
                self._ring = KeyRing.load(self._settings.key_path, create=False)
            except MeshError as exc:
                self.problem = str(exc)
        return self._ring

    def data(self, row: EventRow) -> Any:
        body = row.payload
        if row.encrypted:
            ring = self._keyring()
            if ring is None:
                return "<encrypted: no key ring>"
            try:
                body = ring.decrypt(body)
            except MeshError:
                return "<encrypted: no key in the ring opens it>"
        try:
            return to_jsonable(decode_data(body, row.datacontenttype or OCTETS))
        except MeshError:
            return to_jsonable(body)


def response_excerpt(error: str | None) -> str | None:
    """The start of the receiver's answer kept in a failed attempt's error, if any."""
    if not error:
        return None
    found = _HTTP_ERROR.match(error)
    return found.group("excerpt") if found else None


def event_doc(row: EventRow, data: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "seq": row.stream_seq,
        "time": row.time.isoformat(),
        "source": row.source,
        "type": row.type,
        "subject": row.subject,
        "datacontenttype": row.datacontenttype,
        "origin": row.origin,
        "hops": row.hops,
        "encrypted": row.encrypted,
        "received_at": row.received_at.isoformat(),
        "data": data,
    }


def delivery_doc(row: DeliveryRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "event_id": row.event_id,
        "target": row.target,
        "attempt": row.attempt,
        "outcome": row.outcome,
        "status_code": row.status_code,
        "latency_ms": row.latency_ms,
        "error": row.error,
        "response_excerpt": response_excerpt(row.error),
        "at": row.at.isoformat(),
        "instance": row.instance,
        "trace_id": row.trace_id,
    }

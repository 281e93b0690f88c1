"""Trace spans of the egress, above the delivery drivers: one client span per attempt,
and spans for skips and dead letters. Called only while ``mesh.tracing.TRACER`` is set.

An attempt's span is a child of the publish span the event carries, so every attempt at
every target sits in the publisher's trace; a retry (a later redelivery) is a new span
beside the first, with ``http.request.resend_count`` = attempt - 1.
"""

from __future__ import annotations

from typing import Any

from mesh import tracing
from mesh.envelope import Event
from services.egress.http.sender import AttemptResult

__all__ = ["end_attempt", "mark", "start_attempt"]


def start_attempt(target: str, event: Event, attempt: int, url: str, method: str = "POST") -> Any:
    name, attrs = tracing.http_attributes(url, method, attempt)
    attrs["mesh.target"] = target
    attrs["mesh.delivery.attempt"] = attempt
    return tracing.start_span(name, event, kind="CLIENT", attributes=attrs)


def end_attempt(span: Any, result: AttemptResult) -> None:
    if result.status is not None:
        span.set_attribute("http.response.status_code", result.status)
    if result.ok:
        tracing.end_span(span)
    elif result.status is not None:
        tracing.end_span(span, str(result.status))
    else:
        # The error text may quote the receiver: only its class goes in the span.
        error = result.error or "failed"
        tracing.end_span(span, error.split(":", 1)[0][:64] or "failed")


def mark(name: str, target: str, event: Event, attempt: int, error_type: str | None) -> None:
    """A short span for a decision about one event at one target (skip, dead letter)."""
    span = tracing.start_span(
        f"{name} {target}",
        event,
        attributes={"mesh.target": target, "mesh.delivery.attempt": attempt},
    )
    tracing.end_span(span, error_type)

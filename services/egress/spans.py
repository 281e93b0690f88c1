"""Trace spans of the egress, above the delivery drivers: one client span per attempt,
and spans for skips and dead letters. Called only while ``mesh.tracing.TRACER`` is set.

An attempt's span is a child of the publish span the event carries, so every attempt at
every target sits in the publisher's trace; a retry (a later redelivery) is a new span
beside the first, with ``http.request.resend_count`` = attempt - 1 and a span link to the
previous attempt's span (whose ids are derived, ``tracing.attempt_ids``, not stored).

A webhook attempt is an HTTP client span (``POST <url.template>``); any other kind is a
messaging producer span (``send <target>``) naming the system and the server, never the
URL's user, password, path or query (its URL is the redacted one from the registry).
"""

from __future__ import annotations

from typing import Any

from mesh import tracing
from mesh.envelope import Event
from services.egress.http.sender import AttemptResult

__all__ = ["begin_attempt", "end_attempt", "mark", "start_attempt"]


# target kind -> messaging.system (semantic conventions' names where they have one)
SYSTEMS = {"amqp": "rabbitmq", "mqtt": "mqtt", "redis": "redis", "sqs": "aws_sqs", "s3": "aws_s3"}


def start_attempt(target: str, event: Event, attempt: int, url: str, kind: str = "webhook") -> Any:
    if kind == "webhook":
        name, attrs = tracing.http_attributes(url, "POST", attempt)
        span_kind = "CLIENT"
    else:
        name, span_kind = f"send {target}", "PRODUCER"
        _, server = tracing.url_template(url)
        attrs = {
            "messaging.system": SYSTEMS.get(kind, kind),
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.message.id": event.id,
            "server.address": server["server.address"],
        }
    attrs["mesh.target"] = target
    attrs["mesh.delivery.attempt"] = attempt
    ids = tracing.attempt_ids(event, target, attempt)
    links = None
    if attempt > 1:
        before = tracing.attempt_ids(event, target, attempt - 1)
        links = [tracing.link_to(before[0], before[1], {"mesh.delivery.attempt": attempt - 1})]
    return tracing.start_span(name, event, kind=span_kind, attributes=attrs, links=links, ids=ids)


def begin_attempt(
    target: str, event: Event, attempt: int, url: str, kind: str
) -> tuple[Any, dict[str, str] | None]:
    """The attempt's span (None: tracing off, or the event's trace not sampled) and the
    W3C headers to send: the span's context, else the event's own, else none. Off, this
    is one attribute test and one dict look-up: no span, no context, no SDK call; on, an
    attempt the sampler drops (by the event's flags, or for a root attempt by asking the
    sampler first) builds nothing either."""
    carried = tracing.EXT_TRACEPARENT in event.extensions
    if tracing.TRACER is not None and tracing.wanted(event):
        if carried or tracing.root_sampled(event, target):
            span = start_attempt(target, event, attempt, url, kind)
            return span, tracing.traceparent_of(span)
        return None, None  # a root attempt the sampler drops: nothing built, nothing sent
    if carried:
        return None, tracing.w3c_headers(event)  # untraced: pass the event's context on
    return None, None


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

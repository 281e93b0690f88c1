"""Trace spans of the sink: one per stored event that carries a trace context, as a
child of its publish span, spanning the batch write that stored it (a batch holds
events of many traces, so each gets its own span; they share the batch's times).
Called only while ``mesh.tracing.TRACER`` is set."""

from __future__ import annotations

from typing import Any

from mesh import envelope, tracing
from mesh._nats.types import Msg

__all__ = ["batch_written"]


def batch_written(kind: str, items: list[tuple[Msg, Any]], start_ns: int, db_url: str) -> None:
    """Spans for the messages of a stored batch (``(msg, row)`` pairs); a no-op when off."""
    if tracing.TRACER is None:
        return
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    table = {"events": "events", "dlq": "dead_letters"}.get(kind)
    if table is None:
        return
    backend = "postgresql" if db_url.startswith("postgres") else "sqlite"
    msgs = [m for m, _ in items]
    for msg in msgs:
        headers = msg.headers or {}
        parent = headers.get(envelope.H_TRACEPARENT)
        if not parent or (tracing._FOLLOW_PARENT and parent[-1:] not in tracing._SAMPLED_FLAGS):
            continue
        carrier = {"traceparent": parent}
        if envelope.H_TRACESTATE in headers:
            carrier["tracestate"] = headers[envelope.H_TRACESTATE]
        span = tracing.TRACER.start_span(
            f"sink write {table}",
            context=propagator.extract(carrier),
            kind=SpanKind.INTERNAL,
            start_time=start_ns,
            attributes={
                "db.system.name": backend,
                "db.operation.name": "INSERT",
                "db.collection.name": table,
                "db.operation.batch.size": len(msgs),
                "cloudevents.event_id": headers.get(envelope.H_ID, ""),
            },
        )
        span.end()

"""Trace spans of request/reply (issue #21): the requester's client span, whose context
the request carries (``ce-traceparent``); the answering side's server span, its child,
active while the handler runs; and the reply, which carries the server span's context.

Called only while ``mesh.tracing.TRACER`` is set (``MeshClient.request``, ``answer_request``
and the egress's webhook responder check it). Attributes name subjects, targets and the
reply's status, never data.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from mesh import tracing
from mesh.envelope import Event


class _Answer(Protocol):  # mesh.replies.Reply (not imported: replies imports this module)
    status: int


R = TypeVar("R", bound=_Answer)

__all__ = ["end_serve", "reply_context", "start_serve", "traced_request"]


def _attrs(subject: str, target: str, operation: str) -> dict[str, Any]:
    return {
        "messaging.system": "nats",
        "messaging.operation.type": "send" if operation == "request" else "process",
        "messaging.operation.name": operation,
        "messaging.destination.name": subject,
        "mesh.target": target,
    }


async def traced_request(
    event: Event, subject: str, target: str, ask: Callable[[], Awaitable[R]]
) -> R:
    """``ask()`` (it encodes ``event`` and waits for the reply) inside a client span
    ``request <target>``, under the caller's active span; the event carries its context."""
    span = tracing.start_span(
        f"request {target}", event, kind="CLIENT", attributes=_attrs(subject, target, "request")
    )
    tracing.inject_event(event, span)
    try:
        with tracing.current(span):
            reply = await ask()
    except BaseException as exc:
        tracing.end_span(span, type(exc).__name__)
        raise
    span.set_attribute("mesh.reply.status", reply.status)
    tracing.end_span(span, str(reply.status) if reply.status >= 500 else None)
    return reply


def start_serve(event: Event, subject: str, target: str) -> Any:
    """The server span ``serve <target>`` of answering ``event``, a child of the request's
    span; None when tracing is off or the request's trace is not sampled."""
    if tracing.TRACER is None or not tracing.wanted(event):
        return None
    return tracing.start_span(
        f"serve {target}", event, kind="SERVER", attributes=_attrs(subject, target, "reply")
    )


def end_serve(span: Any, status: int) -> None:
    if span is None:
        return
    span.set_attribute("mesh.reply.status", status)
    tracing.end_span(span, str(status) if status >= 500 else None)


def reply_context() -> dict[str, str]:
    """The active span's W3C context, for the reply (empty when off or none is active)."""
    if tracing.TRACER is None:
        return {}
    from opentelemetry import trace

    span = trace.get_current_span()
    return tracing.traceparent_of(span) if span.get_span_context().is_valid else {}

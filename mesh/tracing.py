"""OpenTelemetry traces (and OTLP metrics), off by default.

Switch: on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
is set and ``OTEL_SDK_DISABLED`` is not ``true``; everything else is the SDK's own
reading of the standard ``OTEL_*`` variables (``OTEL_SERVICE_NAME``,
``OTEL_TRACES_SAMPLER`` / ``_ARG``, ``OTEL_EXPORTER_OTLP_PROTOCOL`` = ``http/protobuf``
(default here) or ``grpc``, ``OTEL_BSP_*``, ``OTEL_METRIC_EXPORT_INTERVAL``...).
Needs the ``mesh[otel]`` extra; asked for without it, the process says so once and
runs untraced.

Zero cost when off: nothing of OpenTelemetry is imported, and every hot path checks
``TRACER is None`` before doing anything else.

Trace context travels with the event as the CloudEvents distributed-tracing extension
(``traceparent``/``tracestate`` -> headers ``ce-traceparent``/``ce-tracestate``), and as
W3C ``traceparent``/``tracestate`` on outgoing requests. Attributes name events, targets
and hosts, never payloads, URLs' paths or queries, or secrets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import structlog

from mesh.envelope import Event

__all__ = [
    "EXT_TRACEPARENT",
    "EXT_TRACESTATE",
    "TRACER",
    "configure",
    "enabled_by_env",
    "event_context",
    "http_attributes",
    "inject_event",
    "shutdown",
    "trace_id_of",
    "w3c_headers",
]

EXT_TRACEPARENT = "traceparent"
EXT_TRACESTATE = "tracestate"

# The SDK tracer while tracing is on; None when off (the hot paths check this).
TRACER: Any = None
# The sampler follows the parent's decision (the default, parentbased_*): an event whose
# context says "not sampled" gets no spans at all, only its context passed on.
_FOLLOW_PARENT = True
_SAMPLED_FLAGS = frozenset("13579bdf")  # last hex digit of the flags: bit 0 = sampled
_url_cache: dict[str, tuple[str, dict[str, Any]]] = {}
_providers: list[Any] = []  # tracer and meter providers to flush on shutdown
_configured = False
# (trace id, span id) the next span takes, set around the start of a delivery attempt's
# span (``attempt_ids``); None: the SDK's random ids.
_SAMPLER: Any = None  # the provider's sampler, asked before a root attempt builds anything
_FORCED_IDS: ContextVar[tuple[int, int] | None] = ContextVar("mesh_span_ids", default=None)

# W3C trace context: version ff, an all-zero trace id or parent id are invalid.
_TRACEPARENT = re.compile(
    r"^(?!ff)[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-[0-9a-f]{2}$"
)
# A path segment kept in url.template: a plain lower-case word (tokens mix case, digits).
_WORD = re.compile(r"^[a-z][a-z_-]{0,23}$")


def enabled_by_env(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(service: str = "mesh") -> bool:
    """Turn tracing on for this process if the environment asks; True when on.

    Safe to call more than once (the first call decides). ``service`` names the process
    when ``OTEL_SERVICE_NAME`` does not.
    """
    global TRACER, _configured
    if _configured:
        return TRACER is not None
    _configured = True
    if not enabled_by_env():
        return False
    try:
        TRACER = _setup(service)
    except ImportError as exc:
        structlog.get_logger("mesh.tracing").warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is missing: "
            "pip install 'mesh[otel]'; running untraced",
            error=str(exc),
        )
        return False
    return True


def _setup(service: str) -> Any:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    grpc = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf").strip() == "grpc"
    span_exporter: Any
    metric_exporter: Any
    if grpc:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    resource = Resource.create(attrs)  # merges OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES
    # Sampler from OTEL_TRACES_SAMPLER; ids random unless an attempt forces its own.
    provider = TracerProvider(resource=resource, id_generator=_id_generator())
    global _FOLLOW_PARENT
    from opentelemetry.sdk.trace.sampling import ParentBased

    _FOLLOW_PARENT = isinstance(provider.sampler, ParentBased)
    global _SAMPLER
    _SAMPLER = provider.sampler
    span_exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    # Not made the global provider: a program embedding MeshClient keeps its own.
    _providers.append(provider)
    if os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip() != "none":
        metric_exporter = OTLPMetricExporter()
        meter_provider = MeterProvider(
            resource=resource, metric_readers=[PeriodicExportingMetricReader(metric_exporter)]
        )
        _providers.append(meter_provider)
        from mesh.otel_metrics import mirror_prometheus

        mirror_prometheus(meter_provider.get_meter("mesh"))
    return provider.get_tracer("mesh")


def _id_generator() -> Any:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class _AttemptIds(RandomIdGenerator):
        def generate_span_id(self) -> int:
            forced = _FORCED_IDS.get()
            return forced[1] if forced is not None else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _FORCED_IDS.get()
            return forced[0] if forced is not None else super().generate_trace_id()

    return _AttemptIds()


def shutdown() -> None:
    """Export what is buffered and turn tracing off; ``configure`` may be called again
    (a process exit flushes by itself: the SDK registers that)."""
    global TRACER, _configured
    TRACER = None
    _configured = False
    while _providers:
        provider = _providers.pop()
        with contextlib.suppress(Exception):
            provider.shutdown()


# Context carried by events ----------------------------------------------------------


def trace_id_of(event: Event) -> str | None:
    """The trace id an event carries (needs no SDK: it is read from the extension)."""
    value = event.extensions.get(EXT_TRACEPARENT)
    if not value:
        return None
    match = _TRACEPARENT.match(value)
    return match.group(1) if match else None


def wanted(event: Event) -> bool:
    """Whether spans for this event may be recorded: False when it carries a context
    marked "not sampled" and the sampler follows parents (then only the context is
    passed on, at the cost of a dict look-up)."""
    parent = event.extensions.get(EXT_TRACEPARENT)
    return parent is None or not _FOLLOW_PARENT or parent[-1:] in _SAMPLED_FLAGS


def event_context(event: Event) -> Any:
    """The OpenTelemetry context an event carries (empty when it carries none)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(event.extensions)


def inject_event(event: Event, span: Any) -> None:
    """Make ``span`` the event's parent context for whoever handles it next."""
    event.extensions.pop(EXT_TRACESTATE, None)
    event.extensions.update(traceparent_of(span))


def w3c_headers(event: Event, span: Any = None) -> dict[str, str]:
    """W3C trace headers for a request carrying ``event``: the span's context when
    tracing, else the event's own (so a receiver still continues the publisher's trace)."""
    if span is not None:
        return traceparent_of(span)
    ext = event.extensions
    parent = ext.get(EXT_TRACEPARENT)
    if not parent or not _TRACEPARENT.match(parent):
        return {}
    headers = {EXT_TRACEPARENT: parent}
    state = ext.get(EXT_TRACESTATE)
    if state:
        headers[EXT_TRACESTATE] = state
    return headers


# Spans ------------------------------------------------------------------------------


def event_attributes(event: Event) -> dict[str, Any]:
    """CloudEvents semantic-convention attributes (no data)."""
    return {
        "cloudevents.event_id": event.id,
        "cloudevents.event_source": event.source,
        "cloudevents.event_type": event.type,
        "cloudevents.event_spec_version": "1.0",
    }


def url_template(url: str) -> tuple[str, dict[str, Any]]:
    """``url.template`` and server attributes for ``url``, with no secret in them: the
    query and user info are dropped, and every path segment that is not a plain word
    becomes ``{}`` (tokens hide in webhook paths)."""
    hit = _url_cache.get(url)
    if hit is not None:
        return hit[0], dict(hit[1])
    parts = urlsplit(url)
    segments = [s if _WORD.match(s) else "{}" for s in parts.path.split("/") if s]
    template = "/" + "/".join(segments)
    attrs: dict[str, Any] = {
        "url.template": template,
        "url.scheme": parts.scheme,
        "server.address": parts.hostname or "",
    }
    port = parts.port or (443 if parts.scheme == "https" else 80)
    attrs["server.port"] = port
    if len(_url_cache) > 4096:
        _url_cache.clear()
    _url_cache[url] = (template, attrs)
    return template, dict(attrs)


def http_attributes(url: str, method: str, attempt: int) -> tuple[str, dict[str, Any]]:
    """Span name and attributes of an HTTP client attempt (semantic conventions)."""
    template, attrs = url_template(url)
    attrs["http.request.method"] = method
    if attempt > 1:
        attrs["http.request.resend_count"] = attempt - 1
    return f"{method} {template}", attrs


def start_span(
    name: str,
    event: Event | None = None,
    *,
    kind: str = "INTERNAL",
    attributes: Mapping[str, Any] | None = None,
    parent: Any = None,
    links: list[Any] | None = None,
    ids: tuple[int, int] | None = None,
) -> Any:
    """Start a span under ``parent`` (a context), else under the event's context, else
    under the current one; ``ids``: its (trace id if a root, span id), else random.
    Call only when ``TRACER`` is set."""
    from opentelemetry.trace import SpanKind

    if parent is None and event is not None and EXT_TRACEPARENT in event.extensions:
        parent = event_context(event)
    attrs = dict(attributes or {})
    if event is not None:
        attrs.update(event_attributes(event))
    token = _FORCED_IDS.set(ids) if ids is not None else None
    try:
        return TRACER.start_span(
            name, context=parent, kind=SpanKind[kind], attributes=attrs, links=links
        )
    finally:
        if token is not None:
            _FORCED_IDS.reset(token)


def _digest(size: int, *parts: str) -> int:
    value = int.from_bytes(
        hashlib.blake2b("\x1f".join(parts).encode(), digest_size=size).digest(), "big"
    )
    return value or 1  # an all-zero id is invalid


def attempt_ids(event: Event, target: str, attempt: int) -> tuple[int, int]:
    """The (trace id, span id) of the span of ``attempt`` at ``target`` for ``event``: a
    function of the event's parent context (else its id), the target and the attempt,
    so the span of a retry (a redelivery, on any egress instance) can link to the span
    of the attempt before it without anything stored. The trace id is the parent's, or,
    for an event that carries no context, one derived from its id (every attempt at
    every target in one trace)."""
    parent = event.extensions.get(EXT_TRACEPARENT)
    match = _TRACEPARENT.match(parent) if parent else None
    if match is not None:
        trace_id = int(match.group(1), 16)
        key = f"{match.group(1)}-{match.group(2)}"
    else:
        trace_id, key = _digest(16, "event", event.id), "event"
    return trace_id, _digest(8, key, event.id, target, str(attempt))


def root_sampled(event: Event, name: str) -> bool:
    """Whether the sampler records a root span for ``event`` (one without a context),
    asked before any attribute, span or header is built: the standard samplers decide
    on the trace id alone, which for a root attempt is derived from the event's id."""
    result = _SAMPLER.should_sample(None, _digest(16, "event", event.id), name)
    return bool(result.decision.is_sampled())


def link_to(trace_id: int, span_id: int, attributes: Mapping[str, Any] | None = None) -> Any:
    """A span link to a (sampled, remote) span known by its ids."""
    from opentelemetry.trace import Link, SpanContext, TraceFlags

    ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return Link(ctx, dict(attributes or {}))


def traceparent_of(span: Any) -> dict[str, str]:
    """W3C ``traceparent``/``tracestate`` of ``span``, formatted directly (the
    propagator's inject costs a context switch and a carrier walk per call)."""
    ctx = span.get_span_context()
    out = {EXT_TRACEPARENT: f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
    if ctx.trace_state:
        out[EXT_TRACESTATE] = ctx.trace_state.to_header()
    return out


def end_span(span: Any, error_type: str | None = None) -> None:
    if error_type is not None:
        from opentelemetry.trace import StatusCode

        span.set_attribute("error.type", error_type)
        span.set_status(StatusCode.ERROR)
    span.end()


@contextlib.contextmanager
def current(span: Any) -> Iterator[None]:
    """``span`` is the active span inside (log lines carry its ids); no-op for None."""
    if span is None:
        yield
        return
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        yield


def add_log_ids(_: Any, __: str, event_dict: Any) -> Any:
    """structlog processor: ``trace_id``/``span_id`` of the active span, if any."""
    if TRACER is None:
        return event_dict
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def publish_span(event: Event, nats_subject: str) -> Any:
    """A producer span for publishing ``event``; its context goes into the event.

    Its parent is the caller's active span, else the context the event already carries
    (a replay, a re-publish), else none (a new trace)."""
    from opentelemetry import trace

    parent = None
    if not trace.get_current_span().get_span_context().is_valid:
        parent = event_context(event) if EXT_TRACEPARENT in event.extensions else None
    span = start_span(
        f"publish {event.source}",
        kind="PRODUCER",
        parent=parent,
        attributes={
            **event_attributes(event),
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": nats_subject,
            "messaging.message.id": event.id,
        },
    )
    inject_event(event, span)
    return span


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans and metrics buffered so far (blocking: run it in a thread)."""
    for provider in list(_providers):
        with contextlib.suppress(Exception):
            provider.force_flush(timeout_ms)


def context_from_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A valid W3C ``traceparent`` (and its ``tracestate``) from request headers, as
    event extensions; empty when there is none (no SDK needed). Values that are not
    strings (a bridge client's JSON frame) count as none."""
    parent = headers.get(EXT_TRACEPARENT)
    if not isinstance(parent, str) or not _TRACEPARENT.match(parent.strip()):
        return {}
    out = {EXT_TRACEPARENT: parent.strip()}
    state = headers.get(EXT_TRACESTATE)
    if isinstance(state, str) and state and len(state) <= 512:
        out[EXT_TRACESTATE] = state.strip()
    return out


def replay_span(headers: dict[str, str], target: str, subject: str, event_id: str) -> None:
    """A producer span for replaying one stored event to ``target``, under the event's
    original context; the replayed copy carries the replay span's context, so its
    deliveries hang under it in the original trace."""
    carrier = {"traceparent": headers.get("ce-traceparent", "")}
    if not carrier["traceparent"] or not _TRACEPARENT.match(carrier["traceparent"]):
        return
    if _FOLLOW_PARENT and carrier["traceparent"][-1:] not in _SAMPLED_FLAGS:
        return
    if "ce-tracestate" in headers:
        carrier["tracestate"] = headers["ce-tracestate"]
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span = start_span(
        f"replay {target}",
        kind="PRODUCER",
        parent=TraceContextTextMapPropagator().extract(carrier),
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.operation.name": "replay",
            "messaging.destination.name": subject,
            "cloudevents.event_id": event_id,
            "mesh.target": target,
        },
    )
    out: dict[str, str] = {}
    from opentelemetry import trace

    TraceContextTextMapPropagator().inject(out, trace.set_span_in_context(span))
    headers["ce-traceparent"] = out["traceparent"]
    if "tracestate" in out:
        headers["ce-tracestate"] = out["tracestate"]
    span.end()


async def traced_publish(
    event: Event, nats_subject: str, publish: Callable[[], Awaitable[bool]]
) -> bool:
    """``publish()`` (True: stored, False: a duplicate) inside the event's publish span."""
    span = publish_span(event, nats_subject)
    try:
        with current(span):
            new = await publish()
    except BaseException as exc:
        end_span(span, type(exc).__name__)
        raise
    span.set_attribute("mesh.duplicate", not new)
    end_span(span)
    return new

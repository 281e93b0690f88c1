"""Logs, metrics and heartbeats, shared by every service.

- ``configure_logging``: structlog, JSON lines by default, console on a TTY or
  when asked; stdlib logging (aiohttp, asyncio, nats) goes through the same
  renderer. Secrets and payloads never reach a line: fields with sensitive
  names are replaced and known secret shapes (``whsec_...``, bearer tokens,
  URL passwords) are masked inside any string value.
- ``METRICS``: every Prometheus family, ``mesh_`` prefixed, defined once here;
  ``write_textfile`` writes them (only them) in node_exporter textfile format.
- ``Heartbeat``: a ``<prefix>.sys.health.<service>.<instance>`` message every few
  seconds with the service's stats; ``ServiceTracker`` turns heartbeats into a
  list of instances with their age, stale after three missed intervals.
- ``DeliveryWindow``: delivery-attempt records over a sliding window: success
  rate, throughput and the last failures per target.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import structlog
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    write_to_textfile,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from structlog.typing import EventDict

from mesh import tracing

# Logging ------------------------------------------------------------------------

REDACTED = "[redacted]"
# Field names whose values never reach a log line ...
REDACTED_KEYS = frozenset(
    {"secret", "secrets", "password", "token", "key", "payload", "data", "body", "authorization"}
)
# ... nor do those of fields whose names contain one of these.
SENSITIVE_PARTS = (
    "secret",
    "password",
    "passwd",
    "token",
    "authorization",
    "cookie",
    "credential",
    "payload",
    "private_key",
)
# Secret shapes masked wherever they appear in a string value.
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"whsec_[A-Za-z0-9+/=_-]+"), "whsec_" + REDACTED),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + REDACTED),
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
)
_MAX_DEPTH = 6
_NOT_SCRUBBED = frozenset({"timestamp", "level", "logger"})


def is_sensitive(key: str) -> bool:
    k = key.lower()
    return k in REDACTED_KEYS or any(part in k for part in SENSITIVE_PARTS)


def scrub_text(text: str) -> str:
    """``text`` with secret-looking substrings masked."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with sensitive keys replaced and secret shapes masked."""
    if isinstance(value, str):
        return scrub_text(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and is_sensitive(k) else redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        # Raw bytes are payload-shaped: say how many, never what.
        return f"<{len(value)} bytes>"
    return value


def _redact(_: Any, __: str, event_dict: EventDict) -> EventDict:
    for k in list(event_dict):
        if k in _NOT_SCRUBBED:
            continue
        if is_sensitive(k):
            event_dict[k] = REDACTED
        else:
            event_dict[k] = redact(event_dict[k])
    return event_dict


def _add_logger_name(logger: Any, _: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")  # a stdlib record, via ProcessorFormatter
    name = record.name if record is not None else getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is at that moment.

    Binding the stream at configure time breaks when it is later replaced and
    closed (a test's capture, a daemon redirecting stderr): every log call would
    raise. A line that cannot be written is dropped, never raised into the caller.
    """

    _lock = threading.Lock()

    def __init__(self, name: str = "") -> None:
        self.name = name

    def msg(self, message: str) -> None:
        with self._lock, contextlib.suppress(ValueError, OSError):
            print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _logger_factory(*args: Any) -> _StderrLogger:
    return _StderrLogger(str(args[0]) if args else "")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stdlib handler on the current ``sys.stderr`` (see ``_StderrLogger``)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        if getattr(self.stream, "closed", False):
            return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(ValueError, OSError):
            super().handleError(record)


_HANDLER_MARK = "_mesh_handler"


def resolve_format(fmt: str, stream: TextIO | None = None) -> str:
    """``json`` or ``console``: ``auto`` means console on a terminal, JSON otherwise."""
    fmt = (fmt or "auto").lower()
    if fmt == "auto":
        stream = stream or sys.stderr
        return "console" if stream.isatty() else "json"
    if fmt not in ("json", "console"):
        return "json"
    return fmt


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Set up structlog (and stdlib logging underneath) for this process; safe to repeat."""
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    if not isinstance(lvl, int):
        lvl = logging.INFO
    fmt = resolve_format(fmt)
    renderer: Any = (
        # Plain tracebacks: rich ones print local variables, which may hold payloads.
        structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        if fmt == "console"
        else structlog.processors.JSONRenderer(default=str)
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            tracing.add_log_ids,  # trace_id/span_id of the active span (tracing on only)
            structlog.processors.add_log_level,
            _add_logger_name,
            timestamper,
            # Tracebacks as plain text (no locals: they may hold payloads), then scrubbed.
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_logger_factory,
        cache_logger_on_first_use=False,
    )
    # Library logs (stdlib logging) come out in the same format, through the same redaction.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            tracing.add_log_ids,
            structlog.processors.add_log_level,
            _add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(lvl, logging.WARNING))
    # nats.py logs connection noise at ERROR on every reconnect attempt; ours says it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    # One line per HTTP request is noise next to the metrics; errors still come through.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # asyncio warns about every TLS peer that hangs up during a refused handshake.
    logging.getLogger("asyncio").setLevel(logging.ERROR)


def delivery_logger(log: Any, event_id: str, target: str, attempt: int) -> Any:
    """``log`` with the fields every delivery line carries bound."""
    return log.bind(event_id=event_id, target=target, attempt=attempt)


# Metrics -------------------------------------------------------------------------


class Metrics:
    """Every mesh_ metric family."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        # Only what this process's MeshClient published (the bridge's WebSocket publishes
        # in `mesh up`), not every event on the stream: the name says so. `mesh status`
        # and /status count the stream.
        self.events_published = Counter(
            "mesh_client_events_published",
            "Events published by this process (not by the CLI or other clients)",
            ["source"],
            registry=registry,
        )
        self.deliveries = Counter(
            "mesh_deliveries", "Delivery outcomes", ["target", "outcome"], registry=registry
        )
        self.delivery_attempts = Counter(
            "mesh_delivery_attempts", "Delivery attempts made", ["target"], registry=registry
        )
        self.delivery_latency = Histogram(
            "mesh_delivery_latency_seconds",
            "Time from send to response, per attempt",
            ["target"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.end_to_end_latency = Histogram(
            "mesh_end_to_end_latency_seconds",
            "Time from publish to successful delivery",
            ["target"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.circuit_state = Gauge(
            "mesh_circuit_state",
            "Circuit breaker state per target (0 closed, 1 half-open, 2 open)",
            ["target"],
            registry=registry,
        )
        self.consumer_pending = Gauge(
            "mesh_consumer_pending",
            "Target queue depth: pending plus unacked",
            ["target"],
            registry=registry,
        )
        self.dlq_depth = Gauge(
            "mesh_dlq_depth", "Dead letters retained", ["target"], registry=registry
        )
        self.sink_rows_written = Counter(
            "mesh_sink_rows_written", "Rows written by the sink", ["table"], registry=registry
        )
        self.sink_rows_pruned = Counter(
            "mesh_sink_rows_pruned",
            "Rows deleted by the sink's retention",
            ["table"],
            registry=registry,
        )
        self.bridge_connections = Gauge(
            "mesh_bridge_connections", "Open WebSocket connections", registry=registry
        )
        self.bridge_frames = Counter(
            "mesh_bridge_frames", "WebSocket frames", ["direction"], registry=registry
        )
        self.bridge_slow_closes = Counter(
            "mesh_bridge_slow_closes", "Clients closed for not keeping up", registry=registry
        )
        self.service_up = Gauge(
            "mesh_service_up", "1 while a service runs", ["service"], registry=registry
        )
        self.service_instances = Gauge(
            "mesh_service_instances",
            "Service instances seen through heartbeats, by state (up, stale, stopped)",
            ["service", "state"],
            registry=registry,
        )


METRICS = Metrics()

CIRCUIT_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class MeshOnly(Collector):
    """The ``mesh_`` families of a registry, without process/platform collectors.

    node_exporter exports its own ``process_*`` series; a textfile repeating
    them would collide, so the textfile carries only ours.
    """

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        prefix: str = "mesh_",
        labels: dict[str, str] | None = None,
    ) -> None:
        self.registry = registry
        self.prefix = prefix
        self.labels = labels or {}

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            if family.name.startswith(self.prefix):
                if self.labels:
                    family.samples = [
                        s._replace(labels={**s.labels, **self.labels}) for s in family.samples
                    ]
                yield family


def write_textfile(
    path: Path, registry: CollectorRegistry = REGISTRY, labels: dict[str, str] | None = None
) -> None:
    """node_exporter textfile format, written atomically (temp file + rename).

    ``labels`` are added to every sample: separate processes sharing one
    textfile directory write one file each, told apart by a label, because
    node_exporter refuses the same series from two files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), MeshOnly(registry, labels=labels))


# Heartbeats ----------------------------------------------------------------------


def new_instance_id() -> str:
    host = socket.gethostname().split(".")[0].lower()
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in host)[:32] or "host"
    return f"{safe}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


@dataclass
class HeartbeatInfo:
    service: str
    instance: str
    at: str
    started_at: str
    status: str
    stats: dict[str, Any]
    interval: float = 5.0

    @classmethod
    def parse(cls, body: bytes) -> HeartbeatInfo:
        """Raises ``ValueError`` or ``TypeError`` on anything but a heartbeat."""
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise TypeError("a heartbeat is a JSON object")
        known = {f.name for f in fields(cls)}
        info = cls(**{k: v for k, v in doc.items() if k in known})
        if not isinstance(info.service, str) or not isinstance(info.instance, str):
            raise TypeError("heartbeat service and instance must be strings")
        if not isinstance(info.stats, dict):
            info.stats = {}
        try:
            info.interval = float(info.interval)
        except (TypeError, ValueError):
            info.interval = 5.0
        return info


class Heartbeat:
    """Publishes a heartbeat every ``interval`` seconds until stopped."""

    def __init__(
        self,
        nc: Any,
        subject: str,
        service: str,
        instance: str,
        stats: Callable[[], dict[str, Any]],
        interval: float = 5.0,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.service = service
        self.instance = instance
        self.stats = stats
        self.interval = interval
        self.started_at = datetime.now(UTC).isoformat()
        self.status = "ok"
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    def payload(self) -> bytes:
        try:
            stats = self.stats()
        except Exception as exc:
            # A broken stats() must not silence the heartbeat: the service would look dead.
            stats = {"stats_error": type(exc).__name__}
        info = HeartbeatInfo(
            service=self.service,
            instance=self.instance,
            at=datetime.now(UTC).isoformat(),
            started_at=self.started_at,
            status=self.status,
            stats=stats,
            interval=self.interval,
        )
        return json.dumps(info.__dict__, default=str).encode()

    async def beat(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(self.subject, self.payload())
            self.sent += 1

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.service}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.status = "stopped"
        await self.beat()


STALE_AFTER_MISSED = 3


@dataclass
class _Seen:
    info: HeartbeatInfo
    received: float
    first_seen: float


class ServiceTracker:
    """Instances seen through heartbeats; stale after ``stale_after`` missed intervals.

    Ages are measured on this process's monotonic clock from when each
    heartbeat arrived, so clock skew between machines does not matter.
    """

    def __init__(
        self,
        default_interval: float = 5.0,
        *,
        stale_after: int = STALE_AFTER_MISSED,
        forget_stale_s: float = 600.0,
        forget_stopped_s: float = 60.0,
        max_instances: int = 2000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default_interval = default_interval
        self.stale_after = stale_after
        self.forget_stale_s = forget_stale_s
        self.forget_stopped_s = forget_stopped_s
        self.max_instances = max_instances
        self.clock = clock
        self._seen: dict[tuple[str, str], _Seen] = {}

    def observe(self, info: HeartbeatInfo) -> None:
        now = self.clock()
        key = (info.service, info.instance)
        prev = self._seen.get(key)
        self._seen[key] = _Seen(info, now, prev.first_seen if prev else now)
        if len(self._seen) > self.max_instances:
            self.prune()
            while len(self._seen) > self.max_instances:
                oldest = min(self._seen, key=lambda k: self._seen[k].received)
                del self._seen[oldest]

    def _interval(self, info: HeartbeatInfo) -> float:
        return info.interval if info.interval > 0 else self.default_interval

    def state(self, seen: _Seen, now: float) -> str:
        if seen.info.status == "stopped":
            return "stopped"
        if now - seen.received > self.stale_after * self._interval(seen.info):
            return "stale"
        return "up"

    def prune(self) -> None:
        now = self.clock()
        for key, seen in list(self._seen.items()):
            age = now - seen.received
            state = self.state(seen, now)
            if (state == "stopped" and age > self.forget_stopped_s) or (
                state == "stale" and age > self.forget_stale_s
            ):
                del self._seen[key]

    def view(self) -> list[dict[str, Any]]:
        """One row per instance, services in name order."""
        self.prune()
        now = self.clock()
        rows = []
        for (service, instance), seen in sorted(self._seen.items()):
            state = self.state(seen, now)
            rows.append(
                {
                    "service": service,
                    "instance": instance,
                    "state": state,
                    "stale": state == "stale",
                    "status": seen.info.status,
                    "age_s": round(now - seen.received, 3),
                    "interval_s": self._interval(seen.info),
                    "started_at": seen.info.started_at,
                    "last_at": seen.info.at,
                    "stats": seen.info.stats,
                }
            )
        return rows

    def live(self) -> Iterator[HeartbeatInfo]:
        now = self.clock()
        for seen in self._seen.values():
            if self.state(seen, now) == "up":
                yield seen.info

    def circuits(self) -> dict[str, dict[str, str]]:
        """``{target: {instance: state}}`` from live instances that report circuits."""
        out: dict[str, dict[str, str]] = {}
        for info in self.live():
            circuits = info.stats.get("circuits")
            if not isinstance(circuits, dict):
                continue
            for target, state in circuits.items():
                out.setdefault(str(target), {})[info.instance] = str(state)
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        """``{(service, state): instances}``."""
        now = self.clock()
        out: dict[tuple[str, str], int] = {}
        for (service, _), seen in self._seen.items():
            key = (service, self.state(seen, now))
            out[key] = out.get(key, 0) + 1
        return out


def worst_circuit(states: Iterable[str]) -> str | None:
    """The most severe of several instances' states (open > half_open > closed)."""
    ranked = sorted(states, key=lambda s: CIRCUIT_VALUES.get(s, -1.0), reverse=True)
    return ranked[0] if ranked else None


# Delivery records ------------------------------------------------------------------

DELIVERED = "delivered"
FAILED_OUTCOMES = frozenset({"retry", "dead", "disabled", "circuit_open"})
MAX_ERROR_CHARS = 200


@dataclass
class _Bucket:
    second: int
    delivered: int = 0
    failed: int = 0
    skipped: int = 0


@dataclass
class _TargetWindow:
    buckets: deque[_Bucket] = field(default_factory=deque)
    last_delivered_at: str | None = None
    last_failed_at: str | None = None


class DeliveryWindow:
    """Delivery attempts per target over the last ``window_s`` seconds, in 1 s buckets.

    Success rate = delivered / (delivered + failed attempts); skipped events
    (loops, hop limit, filters) are not attempts and count for neither.
    Throughput is deliveries per second over the last ``rate_window_s``.
    """

    def __init__(
        self,
        window_s: float = 300.0,
        *,
        rate_window_s: float = 10.0,
        max_failures: int = 50,
        max_targets: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.rate_window_s = rate_window_s
        self.max_targets = max_targets
        self.clock = clock
        self._targets: dict[str, _TargetWindow] = {}
        self.failures: deque[dict[str, Any]] = deque(maxlen=max_failures)
        # Skipped events (filters, loops, hop limit) with their reason: "why didn't my
        # endpoint get this?" answered on the dashboard.
        self.skips: deque[dict[str, Any]] = deque(maxlen=max_failures)

    def observe(
        self,
        target: str,
        outcome: str,
        *,
        event_id: str = "",
        attempt: int = 0,
        status_code: int | None = None,
        error: str | None = None,
        at: str | None = None,
    ) -> None:
        tw = self._targets.get(target)
        if tw is None:
            if len(self._targets) >= self.max_targets:
                return
            tw = self._targets[target] = _TargetWindow()
        second = int(self.clock())
        if not tw.buckets or tw.buckets[-1].second != second:
            tw.buckets.append(_Bucket(second))
        bucket = tw.buckets[-1]
        at = at or datetime.now(UTC).isoformat()
        if outcome == DELIVERED:
            bucket.delivered += 1
            tw.last_delivered_at = at
        elif outcome in FAILED_OUTCOMES:
            bucket.failed += 1
            tw.last_failed_at = at
            self.failures.append(
                {
                    "at": at,
                    "target": target,
                    "event_id": event_id,
                    "attempt": attempt,
                    "outcome": outcome,
                    "status_code": status_code,
                    # Bounded and scrubbed: a receiver's error text is not ours to vouch for.
                    "error": scrub_text(error or "")[:MAX_ERROR_CHARS] or None,
                }
            )
        else:
            bucket.skipped += 1
            self.skips.append(
                {
                    "at": at,
                    "target": target,
                    "event_id": event_id,
                    "reason": (error or "")[:MAX_ERROR_CHARS] or None,
                }
            )
        self._trim(tw, second)

    def _trim(self, tw: _TargetWindow, now_second: int) -> None:
        horizon = now_second - self.window_s
        while tw.buckets and tw.buckets[0].second <= horizon:
            tw.buckets.popleft()

    def targets(self) -> list[str]:
        return sorted(self._targets)

    def summary(self, target: str | None = None) -> dict[str, Any]:
        """Counts, success rate and throughput for one target (or all of them)."""
        now_second = int(self.clock())
        names = [target] if target is not None else list(self._targets)
        delivered = failed = skipped = recent = 0
        last_ok: str | None = None
        last_bad: str | None = None
        for name in names:
            tw = self._targets.get(name)
            if tw is None:
                continue
            self._trim(tw, now_second)
            for b in tw.buckets:
                delivered += b.delivered
                failed += b.failed
                skipped += b.skipped
                # The current second is still filling: the rate covers the last full seconds.
                if now_second - self.rate_window_s <= b.second < now_second:
                    recent += b.delivered
            last_ok = max(filter(None, (last_ok, tw.last_delivered_at)), default=None)
            last_bad = max(filter(None, (last_bad, tw.last_failed_at)), default=None)
        attempts = delivered + failed
        return {
            "window_s": self.window_s,
            "delivered": delivered,
            "failed": failed,
            "skipped": skipped,
            "attempts": attempts,
            "success_rate": round(delivered / attempts, 4) if attempts else None,
            "delivered_per_s": round(recent / self.rate_window_s, 3),
            "last_delivered_at": last_ok,
            "last_failed_at": last_bad,
        }

    def recent_failures(self, limit: int = 20, target: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        rows = [f for f in reversed(self.failures) if target is None or f["target"] == target]
        return rows[:limit]

    def recent_skips(self, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first."""
        return list(reversed(self.skips))[:limit]


def monotonic_ms() -> float:
    return time.monotonic() * 1000

"""Logs, metrics and heartbeats, shared by every service.

- ``configure_logging``: structlog, JSON lines by default, console on a TTY when
  asked; a processor drops secret and payload fields before anything is written.
- ``METRICS``: every Prometheus family, ``mesh_`` prefixed, defined once here.
- ``Heartbeat``: a ``<prefix>.sys.health.<service>.<instance>`` message every few
  seconds with the service's stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    write_to_textfile,
)

# Field names whose values never reach a log line.
REDACTED_KEYS = frozenset(
    {"secret", "secrets", "password", "token", "key", "payload", "data", "body", "authorization"}
)


def _redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for k in list(event_dict):
        if k.lower() in REDACTED_KEYS:
            event_dict[k] = "[redacted]"
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Set up structlog (and stdlib logging underneath) once per process."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, force=True)
    # nats.py logs connection noise at ERROR on every reconnect attempt; ours says it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    # asyncio warns about every TLS peer that hangs up during a refused handshake.
    logging.getLogger("asyncio").setLevel(logging.ERROR)


class Metrics:
    """Every mesh_ metric family."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.events_published = Counter(
            "mesh_events_published", "Events published", ["source"], registry=registry
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


METRICS = Metrics()


def write_textfile(path: Path, registry: CollectorRegistry = REGISTRY) -> None:
    """node_exporter textfile format, written atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)


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

    @classmethod
    def parse(cls, body: bytes) -> HeartbeatInfo:
        return cls(**json.loads(body))


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
        self._task: asyncio.Task[None] | None = None

    def payload(self) -> bytes:
        info = HeartbeatInfo(
            service=self.service,
            instance=self.instance,
            at=datetime.now(UTC).isoformat(),
            started_at=self.started_at,
            status=self.status,
            stats=self.stats(),
        )
        return json.dumps(info.__dict__, default=str).encode()

    async def beat(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(self.subject, self.payload())

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


def monotonic_ms() -> float:
    return time.monotonic() * 1000

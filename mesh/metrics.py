"""``METRICS``: every Prometheus family, ``mesh_`` prefixed, defined once here;
``write_textfile`` writes them (only them) in node_exporter textfile format."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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

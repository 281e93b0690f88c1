"""Logs, metrics and heartbeats, shared by every service: this module gathers the
public names of ``mesh.logs``, ``mesh.metrics``, ``mesh.heartbeats`` and
``mesh.deliverywindow``, one module per concept.

- ``configure_logging``: structlog, JSON lines by default, console on a TTY or
  when asked; stdlib logging (aiohttp, asyncio, nats) goes through the same
  renderer. Secrets and payloads never reach a line: fields with sensitive
  names are replaced and known secret shapes (``whsec_...``, bearer tokens,
  URL passwords) are masked inside any string value.
- ``METRICS``: every Prometheus family, ``mesh_`` prefixed, defined once (``mesh.metrics``);
  ``write_textfile`` writes them (only them) in node_exporter textfile format.
- ``Heartbeat``: a ``<prefix>.sys.health.<service>.<instance>`` message every few
  seconds with the service's stats; ``ServiceTracker`` turns heartbeats into a
  list of instances with their age, stale after three missed intervals.
- ``DeliveryWindow``: delivery-attempt records over a sliding window: success
  rate, throughput and the last failures per target.
"""

from __future__ import annotations

from mesh.deliverywindow import (
    DELIVERED,
    FAILED_OUTCOMES,
    MAX_ERROR_CHARS,
    DeliveryWindow,
    monotonic_ms,
)
from mesh.heartbeats import (
    STALE_AFTER_MISSED,
    Heartbeat,
    HeartbeatInfo,
    ServiceTracker,
    new_instance_id,
    worst_circuit,
)
from mesh.logs import (
    REDACTED,
    REDACTED_KEYS,
    SENSITIVE_PARTS,
    configure_logging,
    delivery_logger,
    is_sensitive,
    redact,
    resolve_format,
    scrub_text,
)
from mesh.metrics import (
    CIRCUIT_VALUES,
    METRICS,
    MeshOnly,
    Metrics,
    write_textfile,
)

__all__ = [
    "CIRCUIT_VALUES",
    "DELIVERED",
    "FAILED_OUTCOMES",
    "MAX_ERROR_CHARS",
    "METRICS",
    "REDACTED",
    "REDACTED_KEYS",
    "SENSITIVE_PARTS",
    "STALE_AFTER_MISSED",
    "DeliveryWindow",
    "Heartbeat",
    "HeartbeatInfo",
    "MeshOnly",
    "Metrics",
    "ServiceTracker",
    "configure_logging",
    "delivery_logger",
    "is_sensitive",
    "monotonic_ms",
    "new_instance_id",
    "redact",
    "resolve_format",
    "scrub_text",
    "worst_circuit",
    "write_textfile",
]

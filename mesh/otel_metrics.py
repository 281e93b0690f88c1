"""OTLP metrics: the Prometheus ``mesh_*`` families, read at each export.

Prometheus stays the source of truth (``/metrics``, the textfile); when tracing is on,
each family is also an OpenTelemetry observable instrument whose callback reads the
current samples, so nothing is counted twice and the hot paths are unchanged.
Counters become observable counters (``*_total``), gauges observable gauges, and a
histogram its ``_count`` and ``_sum`` counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from mesh.observability import MeshOnly

__all__ = ["mirror_prometheus", "samples"]


def samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named ``name`` in the registry's mesh families."""
    out: list[tuple[dict[str, str], float]] = []
    for family in MeshOnly(registry).collect():
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), float(sample.value)))
    return out


def mirror_prometheus(meter: Any, registry: CollectorRegistry = REGISTRY) -> list[str]:
    """Register one observable instrument per mesh sample name; returns the names."""
    from opentelemetry.metrics import CallbackOptions, Observation

    def reader(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, labels) for labels, value in samples(registry, name)]

        return callback

    names: list[str] = []
    for family in MeshOnly(registry).collect():
        if family.type == "counter":
            parts = [(f"{family.name}_total", "counter")]
        elif family.type == "gauge":
            parts = [(family.name, "gauge")]
        elif family.type == "histogram":
            parts = [(f"{family.name}_count", "counter"), (f"{family.name}_sum", "counter")]
        else:
            continue
        for name, kind in parts:
            make = (
                meter.create_observable_counter
                if kind == "counter"
                else (meter.create_observable_gauge)
            )
            make(name, callbacks=[reader(name)], description=family.documentation)
            names.append(name)
    return names

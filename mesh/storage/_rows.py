"""How each row dataclass maps onto its table: columns, keys, value conversions.

Column names are the dataclass field names. Each backend passes its own time
conversion (SQLite stores text, PostgreSQL ``timestamptz``); JSON columns
travel as text both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from operator import attrgetter
from typing import Any, Generic, TypeVar

from mesh.storage._common import dump_json, load_json
from mesh.storage.models import (
    AuditRow,
    DeadLetterRow,
    DeliveryRow,
    EventRow,
    HealthCheckRow,
    PropagationRow,
    ServiceRow,
)

R = TypeVar("R")

TIME_FIELDS = frozenset({"time", "received_at", "at", "dead_at", "created_at", "updated_at"})
JSON_FIELDS = frozenset({"stats", "config", "targets", "before", "after"})


class RowSpec(Generic[R]):
    """One table's row class, columns (= field names) and natural key."""

    def __init__(self, table: str, cls: type[R], fields: tuple[str, ...], key: tuple[str, ...]):
        self.table = table
        self.cls = cls
        self.fields = fields
        self.key = key
        self.columns = ", ".join(fields)
        # Encoding is on the sink's hot path: one attrgetter call per row, and
        # conversions only where a column needs one.
        self._values = attrgetter(*fields)
        self._times = tuple(i for i, f in enumerate(fields) if f in TIME_FIELDS)
        self._jsons = tuple(i for i, f in enumerate(fields) if f in JSON_FIELDS)
        self._key = tuple(fields.index(k) for k in key)

    def encode(self, row: R, ts: Callable[[datetime], Any]) -> tuple[Any, ...]:
        values = list(self._values(row))
        for i in self._times:
            if values[i] is not None:
                values[i] = ts(values[i])
        for i in self._jsons:
            if values[i] is not None:
                values[i] = dump_json(values[i])
        return tuple(values)

    def prepare(self, rows: Iterable[R], ts: Callable[[datetime], Any]) -> list[tuple[Any, ...]]:
        """Encoded rows for a batch insert: the first row per key, sorted by key.

        A fixed order makes two writers that insert overlapping keys take row
        locks in the same order, so they wait on each other instead of deadlocking.
        """
        seen: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        for row in rows:
            values = self.encode(row, ts)
            seen.setdefault(tuple(values[i] for i in self._key), values)
        return [seen[k] for k in sorted(seen)]

    def decode(self, record: Sequence[Any], dt: Callable[[Any], datetime]) -> R:
        values: dict[str, Any] = {}
        for name, value in zip(self.fields, record, strict=True):
            if value is not None:
                if name in TIME_FIELDS:
                    value = dt(value)
                elif name in JSON_FIELDS:
                    value = load_json(value) if isinstance(value, str) else value
                elif name == "payload":
                    value = bytes(value)
                elif name == "encrypted":
                    value = bool(value)
            values[name] = value
        return self.cls(**values)


EVENTS = RowSpec(
    "events",
    EventRow,
    (
        "id",
        "stream_seq",
        "subject",
        "source",
        "type",
        "time",
        "datacontenttype",
        "ce_subject",
        "origin",
        "hops",
        "payload",
        "encrypted",
        "received_at",
        "tenant",
    ),
    ("id",),
)
DELIVERIES = RowSpec(
    "deliveries",
    DeliveryRow,
    (
        "id",
        "event_id",
        "target",
        "attempt",
        "outcome",
        "status_code",
        "latency_ms",
        "error",
        "at",
        "instance",
        "trace_id",
        "tenant",
    ),
    ("id",),
)
DEAD_LETTERS = RowSpec(
    "dead_letters",
    DeadLetterRow,
    (
        "id",
        "event_id",
        "target",
        "attempts",
        "last_error",
        "payload",
        "encrypted",
        "dead_at",
        "stream_seq",
        "tenant",
    ),
    ("id",),
)
HEALTH_CHECKS = RowSpec(
    "health_checks",
    HealthCheckRow,
    ("service", "instance", "at", "status", "stats"),
    ("service", "instance", "at"),
)
SERVICES = RowSpec(
    "services",
    ServiceRow,
    ("name", "kind", "config", "status", "created_at", "updated_at"),
    ("name",),
)
PROPAGATIONS = RowSpec(
    "propagations",
    PropagationRow,
    ("id", "mode", "source", "targets", "types", "created_at"),
    ("id",),
)
AUDIT = RowSpec(
    "audit_log",
    AuditRow,
    ("id", "at", "actor", "action", "entity", "before", "after"),
    ("id",),
)

#: The tables ``write_batch`` fills, in the order it fills them.
BATCH_SPECS: tuple[RowSpec[Any], ...] = (EVENTS, DELIVERIES, DEAD_LETTERS, HEALTH_CHECKS)

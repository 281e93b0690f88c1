"""What keeps the registry cheap with many tenants: one parsed reading of the bucket per
revision, shared, with indexes; and the propagation signature index.

Reading the registry means reading every key of its bucket. Before this, each target's
rules (an egress starting with 3,000 targets), each reconcile and each new propagation
read the whole bucket again: registering N tenants took O(N^2) reads. Now:

- ``SnapshotCache`` keeps the last reading with the bucket revision it was taken at; a
  caller whose revision read matches gets it without a read, and callers arriving while
  a reading is under way share it. Its objects are shared: read-only for callers
  (``Registry`` hands copies to anyone outside).
- ``Snapshot`` indexes targets by name and propagations by tenant, so a target's rules
  cost its tenant's propagations, not the mesh's.
- A propagation's *signature* (its tenant, mode, ends, types, filter and transform) is
  a key of its own, ``propsig.<hash>`` -> the propagation id, so ``add_propagation``
  finds a duplicate with one read instead of a listing. The pointer is checked against
  the propagation it names (a stale one, left by a writer that bypassed the registry,
  is overwritten); propagations written before it existed are indexed once, by the
  first ``add_propagation`` that finds the marker ``meta.propsig`` missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

SIG_PREFIX = "propsig"
SIG_MARKER = "meta.propsig"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Targets and propagations of one reading (in the registry's orders), indexed."""

    revision: int
    targets: list[Any]
    props: list[Any]
    by_ref: dict[str, Any] = field(default_factory=dict)  # target reference -> target
    by_tenant: dict[str, list[Any]] = field(default_factory=dict)  # tenant -> propagations
    names: dict[str, frozenset[str]] = field(default_factory=dict)  # tenant -> target names

    @classmethod
    def of(cls, revision: int, targets: list[Any], props: list[Any]) -> Snapshot:
        by_tenant: dict[str, list[Any]] = {}
        for p in props:
            by_tenant.setdefault(p.tenant, []).append(p)
        names: dict[str, set[str]] = {}
        for t in targets:
            names.setdefault(t.tenant, set()).add(t.name)
        return cls(
            revision,
            targets,
            props,
            {t.ref: t for t in targets},
            by_tenant,
            {tenant: frozenset(n) for tenant, n in names.items()},
        )

    def name_of(self, ref: str) -> tuple[str, str]:
        """(name, tenant) of a target reference (an unknown one: as its form says)."""
        found = self.by_ref.get(ref)
        if found is not None:
            return found.name, found.tenant
        if ref.startswith("~"):
            tenant, _, name = ref[1:].partition(".")
            return name, tenant
        return ref, "default"

    def tenant_names(self, tenant: str) -> frozenset[str]:
        return self.names.get(tenant, frozenset())


class SnapshotCache:
    """The last ``Snapshot`` by revision; one reading at a time, shared by its waiters."""

    def __init__(
        self,
        read: Callable[[int], Awaitable[Snapshot]],
        revision: Callable[[], Awaitable[int]],
    ) -> None:
        self._read = read
        self._revision = revision
        self._last: Snapshot | None = None
        self._pending: tuple[int, asyncio.Future[Snapshot]] | None = None

    async def get(self) -> Snapshot:
        revision = await self._revision()
        last = self._last
        if last is not None and last.revision == revision:
            return last
        pending = self._pending
        if pending is None or pending[0] != revision:
            fut = asyncio.ensure_future(self._read(revision))
            pending = self._pending = (revision, fut)
        try:
            # Shielded: one waiter cancelled must not cancel the reading for the others.
            snap = await asyncio.shield(pending[1])
        finally:
            if self._pending is pending and pending[1].done():
                self._pending = None
        if self._last is None or snap.revision >= self._last.revision:
            self._last = snap
        return snap

    def forget(self) -> None:
        self._last = None


class RecentRevision:
    """A revision read at most every ``max_age`` seconds (one request for all callers):
    for periodic checks of thousands of targets, where a second's lag is fine."""

    def __init__(self, revision: Callable[[], Awaitable[int]]) -> None:
        self._revision = revision
        self._value = -1
        self._at = -1e18
        self._lock = asyncio.Lock()

    async def get(self, max_age: float) -> int:
        if time.monotonic() - self._at <= max_age:
            return self._value
        async with self._lock:
            if time.monotonic() - self._at > max_age:
                self._value = await self._revision()
                self._at = time.monotonic()
            return self._value


def signature(
    tenant: str,
    mode: str,
    source: str,
    targets: list[str],
    types: str | None,
    filter: str | None,
    transform: str | None,
) -> str:
    """The ``propsig.<hash>`` key of a propagation's identity (what makes two the same)."""
    doc = json.dumps([tenant, str(mode), source, sorted(targets), types, filter, transform])
    return f"{SIG_PREFIX}.{hashlib.sha256(doc.encode()).hexdigest()[:40]}"


def signature_of(p: Any) -> str:
    return signature(p.tenant, p.mode, p.source, p.targets, p.types, p.filter, p.transform)

"""``Heartbeat``: a ``<prefix>.sys.health.<service>.<instance>`` message every few
seconds with the service's stats; ``ServiceTracker`` turns heartbeats into a list of
instances with their age, stale after three missed intervals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from mesh.metrics import CIRCUIT_VALUES


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
        port: Any,
        subject: str,
        service: str,
        instance: str,
        stats: Callable[[], dict[str, Any]],
        interval: float = 5.0,
    ) -> None:
        self.port = port  # JetStreamPort: a core publish (send)
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
            await self.port.send(self.subject, self.payload())
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
